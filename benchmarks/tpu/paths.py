"""Where the TPU estimates read their config and write their results and HLO."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
# Each compiled program's optimized HLO (gzip), kept out of git: tpu_aot --reanalyse reads them
# again when the HLO accounting changes, without compiling again.
HLO_DIR = REPO / "benchmarks" / "hlo"
SDXL_CONFIG = REPO / "configs" / "sdxl_base.yaml"
