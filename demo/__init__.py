"""Demo tasks built on troupe's public interfaces; nothing in the core imports this package.

``troupe.demo.arith``: synthetic column addition in the R1-Zero format (a data-source plugin and
a process reward), used by ``configs/arith_cpu.yaml`` and ``configs/arith_process_cpu.yaml``.
"""
