"""Minimal reproduction of bitsandbytes' CPU 4-bit dequantization fault, and tightrope's check of it.

    python benchmarks/bnb_4bit_fault.py

bitsandbytes' ``quantize_4bit`` returns the right codes and per-block absmax; on some CPUs (seen on
AVX-512 machines with bitsandbytes 0.50.2) its ``dequantize_4bit`` scales values by the wrong block's
absmax when a block of 64 straddles two rows. A correct dequantization gives every block's largest
value back as that block's absmax, so each ratio printed below is 1.0 on a correct kernel.
"""

from __future__ import annotations

import logging
import platform

import bitsandbytes
import bitsandbytes.functional as F
import torch

from tightrope.compress import bnb4
from tightrope.provenance import _cpu_name


def main() -> None:
    logging.getLogger("tightrope").setLevel(logging.ERROR)  # the check's line is printed below
    print(f"CPU: {_cpu_name()} ({platform.machine()}), torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, "
          f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for shape in ((48, 96), (384, 384)):
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.05
        for quant_type in ("nf4", "fp4"):
            q, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)
            d = F.dequantize_4bit(q, state)
            ratio = d.reshape(-1, 64).abs().amax(1) / w.reshape(-1, 64).abs().amax(1)
            print(f"{quant_type} {shape[0]}x{shape[1]}: block absmax ratio min {ratio.min():.3f} max {ratio.max():.3f}"
                  f"  first six {[round(float(r), 2) for r in ratio[:6]]}")
    print(bnb4.kernel_check().line())
    for fault in bnb4.kernel_check().faults:
        print("  ", fault)


if __name__ == "__main__":
    main()
