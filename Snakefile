# vmddpm: the VM-DDPM reproduction as a Snakemake workflow. Thin on purpose: every rule calls the
# `vmddpm` CLI, every knob comes from params.yaml (read through vmddpm.config), and the DAG is
# download -> prepare -> train -> sample -> evaluate (and train -> sweep) -> report -> dvc commit, over
# datasets x models.
#
#   snakemake --cores all                      # demo scale (CPU, minutes)
#   snakemake --cores all --config scale=paper # real data, paper-sized networks (GPU)
#   snakemake --cores all --use-conda          # per-rule environments from env/
#   snakemake --profile workflow/profiles/slurm
#   snakemake --workflow-profile workflow/profiles/default   # cores all, printed commands, failed logs
#   snakemake --report report.html

include: "workflow/rules/common.smk"


wildcard_constraints:
    dataset="|".join(DATASETS),
    model="|".join(MODELS),


include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        REPORT_OUTPUTS,
        DVC_DONE,
