rule report:
    input:
        metrics=expand(metrics("{dataset}", "{model}"), dataset=DATASETS, model=MODELS),
        sweeps=expand(sweep_json("{dataset}", "{model}"), dataset=DATASETS, model=MODELS),
        reference=REFERENCE,
        scaling=SCALING,
    output:
        [report(p, category="Tables", caption="../report/tables.rst") for p in REPORT_OUTPUTS],
        report(
            directory(FIGURES),
            patterns=["{name}.png"],
            category="Figures",
            caption="../report/figures.rst",
        ),
    params:
        cli=CLI,
        knobs=knobs("report"),
    log:
        "logs/report.log",
    benchmark:
        "logs/benchmarks/report.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        gpu=0,
    conda:
        "../../env/eval.yaml"
    shell:
        "{params.cli} report > {log} 2>&1"


# Last: record every stage's outputs in dvc.lock, so `dvc status` is clean after a Snakemake run and
# `dvc push` ships data and checkpoints. Skipped (with a note) outside a DVC repository.
rule dvc_commit:
    input:
        REPORT_OUTPUTS,
        FIGURES,
    output:
        touch(DVC_DONE),
    log:
        "logs/dvc_commit.log",
    benchmark:
        "logs/benchmarks/dvc_commit.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        gpu=0,
    conda:
        "../../env/cpu.yaml"
    shell:
        "if [ -d .dvc ]; then dvc commit --force --quiet > {log} 2>&1; "
        "else echo 'not a DVC repository: skipped dvc commit' > {log}; fi"
