"""dpo-ray: Direct Preference Optimization as a resumable sample -> label -> reference -> train -> evaluate DAG on
Ray. The driver reports through the `dpo_ray` logger, one `[dpo-ray] ...` line per record on standard output
(reports.py's tables through `dpo_ray.report`, as they are)."""

import logging
import sys


class _CurrentStdout(logging.StreamHandler):
    """Writes to sys.stdout as it is at each record (a redirected stream, pytest's capture), not as it was when the
    package was imported."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


def _to_stdout(name: str, fmt: str) -> None:
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter(fmt))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


_to_stdout("dpo_ray", "[dpo-ray] %(message)s")
# Tables and the closing summary, printed as they are.
_to_stdout("dpo_ray.report", "%(message)s")
# bitsandbytes warns at import, on CPUs with AVX512-BF16, that its fused bf16 4-bit kernel (the `kernels` package) is
# missing; models.load_causal_lm turns that kernel off for every 4-bit layer, so the warning is noise in every run.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
