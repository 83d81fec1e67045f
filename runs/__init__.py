"""Experiment presets (TOML), installed with the package as `warp_phys.presets`.

`warp-phys compare NAME` and `warp-phys train NAME` read `NAME.toml` from here; run outputs
go to runs/out/ (git-ignored, never installed) and recorded results to runs/results/.
"""
