# stmdit: STMDiT reproduction pipeline. Table of contents only; see workflow/rules/.
from snakemake.utils import min_version

min_version("9.0")


# config.yaml is the default configuration. A --configfile replaces it rather than merging into
# it (merged, the demo's models would join yours); keys it leaves out take the defaults of
# workflow/schemas/config.schema.yaml. To layer one file on the other, give both after one flag:
# `snakemake all --configfile config.yaml my.yaml`. (`--config KEY=VALUE` alone layers on config.yaml.)
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"



include: "workflow/rules/common.smk"

# Wildcards match only names from the sample sheet and config (lists built in common.smk).
wildcard_constraints:
    sample=SAMPLE_PATTERN,
    cohort=COHORT_PATTERN,
    encoder=IMAGE_ENCODER_PATTERN,
    model=MODEL_PATTERN,


include: "workflow/rules/demo.smk"
include: "workflow/rules/lists.smk"
include: "workflow/rules/spots.smk"
include: "workflow/rules/expression.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/split.smk"
include: "workflow/rules/ptpl.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/tiles.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/virtual.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
