"""stmdit: a Snakemake pipeline reproducing STMDiT (Vlachas et al., 2026)."""

import warnings

__version__ = "0.1.0"

# Patches stores written before the JPEG-LS codec (stmdit.patch_codec) used zarr-python's
# numcodecs.delta filter; zarr warns on every open of one that other zarr implementations may not read it.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")
