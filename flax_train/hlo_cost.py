"""What a compiled XLA program does per run, counted from its optimized HLO text.

XLA's own ``cost_analysis()`` counts a ``while`` loop's body once, whatever its trip count. A
training step is full of loops: the layers of ``model.scan_layers``, gradient accumulation's
micro-batches, and, on a TPU, the collective matmuls the compiler makes of FSDP's gathered
products (a loop of collective-permutes and partial products, two chunks per iteration). This
walks the program instead, counting every computation's work as often as it runs: a loop body
times the loop's trip count, read from XLA's ``known_trip_count`` or, where the final HLO no longer
carries it (the TPU compiler's), from the loop itself (``for i = start; i < bound; i += step``).
A loop it cannot read counts once and is reported.

* FLOPs: 2 x the multiply-adds of every dot and convolution, inside fusions too, and of GPU
  library calls (cuBLAS GEMMs, cuDNN convolutions). A convolution's taps on its zero padding are
  left out: the TPU compiler writes many products as convolutions over a padded dimension.
  Elementwise work is left out: next to SDXL's products it is small, and on a TPU it does not run
  on the matrix units.
* Collectives: the bytes each device receives over the interconnect, for the usual ring
  algorithms: all-gather (n-1) x its operand, reduce-scatter and all-to-all (n-1)/n of the
  operand, all-reduce 2 (n-1)/n, collective-permute the operand, for a group of n devices. Each
  collective counts once however many fusions print it (the TPU compiler's asynchronous
  collectives: a start, pieces overlapped with compute, a done, all with one channel_id).
* Between slices (multislice), over the data-centre network: the TPU compiler writes each slice's
  program with the transfers to the other slices as host-transfer sends that the runtime
  (``megascale``) carries out, all-reducing or all-gathering across the slices. Each device's send
  is counted as the collective it names over the slices (the bytes a device receives, as above).
* HBM traffic: what each unfused instruction reads and writes (a fusion its operands and result,
  a scanned layer's slice rather than the whole stack). An upper estimate: on a TPU it also
  counts the compiler's copies between memory spaces.
* Custom calls (Pallas kernels such as splash attention) are opaque: counted, not priced.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from functools import cache
from typing import Any

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
    "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# The version of these counting rules, kept with every count. 2: an asynchronous collective that the
# TPU compiler splits into several fusions counts once, its all-reduce-and-slice fusions count as
# the reduce-scatters they are, and a mesh group with reordered devices has its own size; version 1
# counted a TPU collective once per fusion printing it, its FLOP and memory counts unchanged since.
ACCOUNTING = 2

_SHAPE = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclasses.dataclass
class Cost:
    """Per device, for one run of the program."""

    flops: float = 0.0
    # Read and written by each instruction outside fusions: an upper estimate of HBM traffic (on
    # a TPU it also counts the copies and slices between memory spaces the compiler schedules).
    hbm_bytes: float = 0.0
    collective_bytes: float = 0.0  # received over the interconnect
    collective_bytes_by_kind: Counter = dataclasses.field(default_factory=Counter)
    dcn_bytes: float = 0.0  # received from other slices over the data-centre network (multislice)
    custom_calls: Counter = dataclasses.field(default_factory=Counter)
    loops_without_trip_count: int = 0
    # Collectives seen but not yet counted, by channel: the TPU compiler splits one asynchronous
    # collective into fusions (its start, pieces that overlap it with compute, its done) that each
    # print the same collective with the same channel_id. A computation counts each channel once.
    unsettled: dict = dataclasses.field(default_factory=dict)

    def add(self, other: "Cost", times: float = 1.0) -> None:
        for key, value in other.unsettled.items():
            self.unsettled.setdefault(key, value)
        self.flops += times * other.flops
        self.hbm_bytes += times * other.hbm_bytes
        self.collective_bytes += times * other.collective_bytes
        self.dcn_bytes += times * other.dcn_bytes
        for kind, n in other.collective_bytes_by_kind.items():
            self.collective_bytes_by_kind[kind] += times * n
        for target, n in other.custom_calls.items():
            self.custom_calls[target] += times * n
        self.loops_without_trip_count += other.loops_without_trip_count


def shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every array shape in an HLO type, e.g. ``(bf16[2,3]{1,0}, f32[])`` -> [(bf16, (2, 3)), (f32, ())]."""
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _SHAPE.findall(type_text)
            if dtype in DTYPE_BYTES]


def nbytes(type_text: str) -> float:
    return sum(DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in shapes(type_text))


def _split_type(rest: str) -> tuple[str, str]:
    """``TYPE opcode(...)...`` -> (TYPE, ``opcode(...)...``); a tuple type holds spaces."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _operands(call: str) -> tuple[list[str], str]:
    """``opcode(%a, %b), attrs`` -> (['a', 'b'], attrs)."""
    start = call.index("(")
    depth = 0
    for i in range(start, len(call)):
        depth += {"(": 1, ")": -1}.get(call[i], 0)
        if depth == 0:
            inner, attrs = call[start + 1 : i], call[i + 1 :]
            break
    else:
        inner, attrs = call[start + 1 :], ""
    names = re.findall(r"%([\w.\-]+)", inner)
    return names, attrs


def group_size(attrs: str, devices: int) -> int:
    """Devices per replica group of a collective, in any of XLA's three spellings."""
    # mesh['x'=8,'y'=1] {'x'}: the named axes; a mesh whose devices are not in order lists them
    # in between: mesh['x'=2,'y'=4], device_ids=([4,2]T(1,0)) {'y'}
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=[^{]*)?\s*\{([^}]*)\}", attrs)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m[1])}
        return math.prod(sizes[k] for k in re.findall(r"'([^']+)'", m[2]))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", attrs)
    if m:  # [groups, size]<=[devices]
        return int(m[2])
    m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if m:
        return len(m[1].split(","))
    # source_target_pairs (collective-permute) or empty groups: every device
    return devices


def _dot_flops(result: str, lhs: str, attrs: str) -> float:
    """A dot, or a GPU GEMM library call (its dimension numbers in its backend config)."""
    (_, out), (_, lhs_dims) = shapes(result)[0], shapes(lhs)[0]
    m = re.search(r'lhs_contracting_dims=\{([\d,]*)\}|"lhs_contracting_dimensions":\[([^\]]*)\]', attrs)
    dims = re.findall(r"\d+", (m[1] or m[2]) if m else "")
    return 2.0 * math.prod(out) * math.prod(lhs_dims[int(d)] for d in dims)


def _convolution_flops(result: str, lhs: str, rhs: str, attrs: str) -> float:
    """2 x the multiply-adds whose input lands on the input: taps on the zero padding are left
    out. The TPU compiler writes many products as convolutions over a padded size-1 dimension
    (two chunks of a collective matmul in one instruction, a weight gradient), so counting every
    kernel tap, as torch's FlopCounterMode does for an ordinary 3x3 convolution, would double them."""
    (_, out), (_, lhs_dims), (_, kernel) = shapes(result)[0], shapes(lhs)[0], shapes(rhs)[0]
    labels = re.search(r"dim_labels=([^_]+)_([^-]+)->(\S+?)(?:,|$)", attrs)
    if not labels:
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels[1], labels[2], labels[3]
    spatial = sorted(c for c in rhs_labels if c.isdigit())
    window_text = re.search(r"window=\{([^}]*)\}", attrs)
    window = dict(re.findall(r"(\w+)=([\dx_]+)", window_text[1] if window_text else ""))

    def per_dim(key: str, default: str) -> list[str]:
        return window[key].split("x") if key in window else [default] * len(spatial)

    pads, strides = per_dim("pad", "0_0"), per_dim("stride", "1")
    lhs_dilations, rhs_dilations = per_dim("lhs_dilate", "1"), per_dim("rhs_dilate", "1")
    taps, out_spatial = 1, 1
    for d, dim in enumerate(spatial):
        size = out[out_labels.index(dim)]
        out_spatial *= size
        taps *= _taps_on_input(lhs_dims[lhs_labels.index(dim)], kernel[rhs_labels.index(dim)], size,
                               int(strides[d]), int(pads[d].split("_")[0]), int(lhs_dilations[d]), int(rhs_dilations[d]))
    return 2.0 * math.prod(out) / out_spatial * taps * kernel[rhs_labels.index("i")]


@cache
def _taps_on_input(size: int, window: int, out: int, stride: int, pad_low: int, lhs_dilation: int,
                   rhs_dilation: int) -> int:
    """(output position, kernel tap) pairs of one spatial dimension that read a real input element."""
    span = (size - 1) * lhs_dilation + 1
    return sum(1 for o in range(out) for t in range(window)
               if 0 <= (p := o * stride + t * rhs_dilation - pad_low) < span and p % lhs_dilation == 0)


def _received_bytes(kind: str, operand_bytes: float, n: int) -> float:
    if n <= 1:
        return 0.0
    return {
        "all-gather": (n - 1) * operand_bytes,
        "reduce-scatter": (n - 1) / n * operand_bytes,
        "all-to-all": (n - 1) / n * operand_bytes,
        "all-reduce": 2 * (n - 1) / n * operand_bytes,
        "collective-permute": operand_bytes,
    }[kind]


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    type: str
    opcode: str
    operands: tuple[str, ...]
    attrs: str


# Instructions that move no data of their own (views, bookkeeping) or whose work is counted where
# it happens (a loop's body, an async pair's start).
_NO_TRAFFIC = {
    "parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id",
    "replica-id", "opt-barrier", "while", "conditional", "call", "iota",
}  # fmt: skip


def parse(hlo_text: str) -> tuple[dict[str, list[_Instruction]], str]:
    """Computations by name, and the entry computation's name."""
    computations: dict[str, list[_Instruction]] = {}
    entry = current = None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header[2]
            computations[current] = []
            if header[1]:
                entry = current
            continue
        m = _INSTRUCTION.match(line) if current is not None and not line.startswith("}") else None
        if m:
            type_text, call = _split_type(m[2])
            opcode = call.split("(", 1)[0].strip()
            operands, attrs = _operands(call) if "(" in call else ([], "")
            if opcode in ("parameter", "constant"):  # parameter(2), constant(10): keep the number
                attrs = call[call.index("(") + 1 : call.index(")")]
            computations[current].append(_Instruction(m[1], type_text, opcode, tuple(operands), attrs))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _fusion_traffic(fused: list[_Instruction], result_type: str, operand_types: list[str]) -> float:
    """HBM bytes a fusion reads and writes: its operands and result, except that an operand the
    fusion only slices (a scanned layer's weights out of the stacked ones) is read slice by slice,
    and a result updated in place (a scan writing one layer's residuals) writes the update only."""
    by_name = {i.name: i for i in fused}
    users: dict[str, list[_Instruction]] = {}
    for i in fused:
        for o in i.operands:
            users.setdefault(o, []).append(i)
    root = fused[-1] if fused else None
    in_place = root is not None and root.opcode == "dynamic-update-slice"
    update = by_name.get(root.operands[1]) if in_place and len(root.operands) > 1 else None
    total = nbytes(update.type) if update else nbytes(result_type)
    for param in (i for i in fused if i.opcode == "parameter"):
        index = int(param.attrs)
        if index >= len(operand_types):
            continue
        readers = users.get(param.name, [])
        if in_place and root.operands and root.operands[0] == param.name:
            continue  # the buffer updated in place is not read
        if readers and all(r.opcode in ("dynamic-slice", "slice") for r in readers):
            total += sum(nbytes(r.type) for r in readers)
        else:
            total += nbytes(operand_types[index])
    return total


def analyse(hlo_text: str, devices: int = 1, slices: int = 1) -> Cost:
    """Per-device cost of one run of the entry computation of an optimized HLO module; for a
    multislice program, ``devices`` per slice and the number of ``slices``."""
    computations, entry = parse(hlo_text)
    types = {i.name: i.type for body in computations.values() for i in body}

    by_name = {c: {i.name: i for i in body} for c, body in computations.items()}

    def value(computation: str, name: str, env: tuple = ()) -> Any:
        """A loop counter's scalar as far as it can be read: an int (a constant), ``("i", k)``
        (element k of the loop state), ``("i", k, step)`` (that element plus a constant), else None.
        ``env``: the values of a fused computation's parameters."""
        i = by_name[computation].get(name)
        if i is None:
            return None
        if i.opcode == "constant":
            return int(i.attrs) if re.fullmatch(r"\s*-?\d+\s*", i.attrs) else None
        if i.opcode == "parameter":
            index = int(i.attrs)
            return env[index] if index < len(env) else None
        if i.opcode == "get-tuple-element":
            source = by_name[computation].get(i.operands[0])
            k = re.search(r"index=(\d+)", i.attrs)
            return ("i", int(k[1])) if source is not None and source.opcode == "parameter" and k else None
        if i.opcode in ("copy", "bitcast", "convert") and i.operands:
            return value(computation, i.operands[0], env)
        if i.opcode == "add" and len(i.operands) == 2:
            a, b = (value(computation, o, env) for o in i.operands)
            counter, step = (a, b) if isinstance(b, int) else (b, a)
            if isinstance(step, int) and isinstance(counter, tuple) and len(counter) == 2:
                return (*counter, step)
            return None
        if i.opcode == "compare" and len(i.operands) == 2 and "direction=LT" in i.attrs:
            return ("lt", value(computation, i.operands[0], env), value(computation, i.operands[1], env))
        if i.opcode == "fusion":
            called = re.search(r"\bcalls=%?([\w.\-]+)", i.attrs)
            if called and computations.get(called[1]):
                args = tuple(value(computation, o, env) for o in i.operands)
                return value(called[1], computations[called[1]][-1].name, args)
        return None

    def trip_count(while_: _Instruction, caller: str) -> int | None:
        """The loop's trip count: XLA's ``known_trip_count`` where it printed one, else read from
        the loop itself, ``for (i = start; i < bound; i += step)``: the bound from its condition,
        the step from its body, the start from its initial state. (The TPU compiler's final HLO
        drops the annotation, and its collective matmuls step by 2.)"""
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', while_.attrs)
        if known:
            return int(known[1])
        condition = re.search(r"\bcondition=%?([\w.\-]+)", while_.attrs)
        body = re.search(r"\bbody=%?([\w.\-]+)", while_.attrs)
        if not (condition and body and computations.get(condition[1]) and computations.get(body[1])):
            return None
        test = value(condition[1], computations[condition[1]][-1].name)
        if not (isinstance(test, tuple) and test[0] == "lt" and isinstance(test[1], tuple) and isinstance(test[2], int)):
            return None
        k, bound = test[1][1], test[2]
        root = computations[body[1]][-1]
        update = value(body[1], root.operands[k]) if root.opcode == "tuple" and k < len(root.operands) else None
        if not (isinstance(update, tuple) and len(update) == 3 and update[1] == k and update[2] > 0):
            return None
        start = 0
        state = by_name[caller].get(while_.operands[0]) if while_.operands else None
        if state is not None and state.opcode == "tuple" and k < len(state.operands):
            initial = value(caller, state.operands[k])
            start = initial if isinstance(initial, int) else 0
        return max(0, -(-(bound - start) // update[2]))

    @cache
    def cost_of(computation: str, fused: bool = False) -> Cost:
        total = Cost()
        for i in computations.get(computation, ()):
            opcode, operands, attrs = i.opcode, i.operands, i.attrs
            if opcode == "dot" and len(operands) >= 2:
                total.flops += _dot_flops(i.type, types.get(operands[0], ""), attrs)
            elif opcode == "convolution" and len(operands) >= 2:
                total.flops += _convolution_flops(i.type, types.get(operands[0], ""), types.get(operands[1], ""), attrs)
            elif opcode.removesuffix("-start") in COLLECTIVES:
                kind = opcode.removesuffix("-start")
                n = group_size(attrs, devices)
                root = computations[computation][-1]
                if (kind == "all-reduce" and root.opcode == "dynamic-slice" and root.operands[:1] == (i.name,)
                        and nbytes(root.type) * n == nbytes(i.type)):
                    # The TPU compiler's reduce-scatter: a fusion that all-reduces and keeps its own 1/n
                    # (emitted as a ring reduce-scatter).
                    kind = "reduce-scatter"
                received = _received_bytes(kind, sum(nbytes(types.get(o, "")) for o in operands), n)
                channel = re.search(r"\bchannel_id=(\d+)", attrs)
                key = ("channel", channel[1]) if channel else ("instruction", computation, i.name)
                total.unsettled.setdefault(key, (kind, received))
            elif opcode == "send" and "_xla_megascale_transfer_type" in attrs:
                kind = re.search(r'_xla_megascale_transfer_type="?(\w+)', attrs)[1].lower().replace("_", "-")
                operand = sum(nbytes(types.get(o, "")) for o in operands[:1])
                total.dcn_bytes += _received_bytes(kind if kind in COLLECTIVES else "collective-permute", operand, slices)
            elif opcode == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', attrs)
                target = target[1] if target else "?"
                total.custom_calls[target] += 1
                # On GPUs XLA hands products to cuBLAS / cuDNN as library calls.
                if "gemm" in target.lower() and operands:
                    total.flops += _dot_flops(i.type, types.get(operands[0], ""), attrs)
                elif "cudnn$conv" in target and len(operands) >= 2:
                    total.flops += _convolution_flops(i.type, types.get(operands[0], ""), types.get(operands[1], ""), attrs)
            if (not fused and opcode not in _NO_TRAFFIC and not opcode.endswith(("-done", "-update"))
                    and 'custom_call_target="AllocateBuffer"' not in attrs):
                total.hbm_bytes += _traffic(i)
            if opcode == "while":
                body = re.search(r"\bbody=%?([\w.\-]+)", attrs)
                trips = trip_count(i, computation)
                if trips is None:
                    total.loops_without_trip_count += 1
                if body:
                    total.add(cost_of(body[1]), trips or 1)
                continue
            if opcode.endswith(("-done", "-update")):
                continue  # the work of an async pair is counted at its start
            branches = _BRANCHES.search(attrs)
            if branches:  # one branch runs: count the dearest
                options = [cost_of(b.strip().lstrip("%")) for b in branches[1].split(",") if b.strip()]
                if options:
                    total.add(max(options, key=lambda c: c.flops))
                continue
            for key, called in _CALLED.findall(attrs):
                # to_apply is a reduction's scalar function or a call; condition is a loop test.
                if key in ("calls", "to_apply", "true_computation", "false_computation") and called in computations:
                    total.add(cost_of(called, fused or opcode == "fusion" or key == "to_apply"))
        if not fused:  # a fused computation's collectives are settled by the computation that calls it
            for kind, received in total.unsettled.values():
                total.collective_bytes += received
                total.collective_bytes_by_kind[kind] += received
            total.unsettled = {}
        return total

    def _traffic(i: _Instruction) -> float:
        operand_types = [types.get(o, "") for o in i.operands]
        if i.opcode == "fusion":
            called = re.search(r"\bcalls=%?([\w.\-]+)", i.attrs)
            if called and called[1] in computations:
                return _fusion_traffic(computations[called[1]], i.type, operand_types)
        if i.opcode == "dynamic-slice":
            return 2 * nbytes(i.type)
        if i.opcode == "dynamic-update-slice" and len(operand_types) > 1:
            return 2 * nbytes(operand_types[1])
        return nbytes(i.type) + sum(nbytes(t) for t in operand_types)

    return cost_of(entry)


def summary(cost: Cost) -> dict[str, object]:
    """JSON-ready figures of a ``Cost``."""
    return {
        "hlo_accounting": ACCOUNTING,
        "hlo_flops_per_device": cost.flops,
        "hlo_hbm_bytes_per_device": cost.hbm_bytes,
        "collective_bytes_per_device": cost.collective_bytes,
        "collective_bytes_by_kind": dict(cost.collective_bytes_by_kind),
        "dcn_bytes_per_device": cost.dcn_bytes,
        "custom_calls": dict(cost.custom_calls),
        "loops_without_trip_count": cost.loops_without_trip_count,
    }


if __name__ == "__main__":  # python -m flax_train.hlo_cost FILE.hlo[.gz] [DEVICES]
    import gzip
    import sys

    path = sys.argv[1]
    text = (gzip.open(path, "rt") if path.endswith(".gz") else open(path)).read()
    print(json.dumps(summary(analyse(text, int(sys.argv[2]) if len(sys.argv) > 2 else 1)), indent=2))
