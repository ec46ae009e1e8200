"""stmdit: a Snakemake pipeline reproducing STMDiT (Vlachas et al., 2026)."""

import warnings

__version__ = "0.1.0"

# The patches stores' delta filter is zarr-python's numcodecs.delta (stmdit.spots.patch_codecs);
# zarr warns on every open that other zarr implementations may not read it (the README says so once).
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")
