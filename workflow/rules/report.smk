# The report's tables and figures. In `snakemake --report`, each table is an HTML file (rendered in the
# report's viewer; Snakemake 9 offers CSV/TSV files as downloads only) with its own caption, the CSV and
# Markdown twins are listed as data, and the figures are one entry each.
rule report:
    input:
        metrics=expand(metrics("{dataset}", "{model}"), dataset=DATASETS, model=MODELS),
        protocols=expand(protocol("{dataset}", "{model}"), dataset=DATASETS, model=MODELS),
        sweeps=expand(sweep_json("{dataset}", "{model}"), dataset=DATASETS, model=MODELS),
        # eval_history.csv and eval/ (FID against training step, the showcase figures)
        trains=expand(train_dir("{dataset}", "{model}"), dataset=DATASETS, model=MODELS),
        reference=REFERENCE,
        scaling=SCALING,
    output:
        main=report(
            REPORT_TABLES["main.html"],
            category="Tables",
            caption="../report/main.rst",
            labels={"table": "main results", "format": "HTML"},
        ),
        ablation=report(
            REPORT_TABLES["ablation.html"],
            category="Tables",
            caption="../report/ablation.rst",
            labels={"table": "ablations", "format": "HTML"},
        ),
        main_csv=report(
            REPORT_TABLES["main.csv"],
            category="Data",
            caption="../report/main_csv.rst",
            labels={"table": "main results", "format": "CSV"},
        ),
        ablation_csv=report(
            REPORT_TABLES["ablation.csv"],
            category="Data",
            caption="../report/ablation_csv.rst",
            labels={"table": "ablations", "format": "CSV"},
        ),
        main_md=REPORT_TABLES["main.md"],
        ablation_md=REPORT_TABLES["ablation.md"],
        claims=CLAIMS,
        summary=report(
            SUMMARY,
            category="Data",
            caption="../report/summary.rst",
            labels={"table": "FID and KID per run (DVC metrics)", "format": "JSON"},
        ),
        figures=report(
            directory(FIGURES),
            patterns=["{name}.png"],
            category="Figures",
            caption="../report/figures.rst",
            labels={"figure": "{name}"},
        ),
    params:
        cli=cli,
        knobs=knobs("report"),
    log:
        logs("report.log"),
    benchmark:
        logs("benchmarks/report.tsv")
    threads: 1
    resources:
        mem_mb=2000,
        gpu=0,
    conda:
        "../envs/eval.yaml"
    shell:
        "{params.cli} report > {log} 2>&1"


# Last: record every stage's outputs in dvc.lock, so `dvc status` is clean after a Snakemake run and
# `dvc push` ships data and checkpoints. Skipped (with a note) outside a DVC repository, and when
# --config/--configfile changed knobs: dvc.lock would record params.yaml's values for outputs made with
# others. A stale dvc.lock (dvc.yaml older than params.yaml's matrix) stops it with the fix.
rule dvc_commit:
    input:
        REPORT_OUTPUTS,
        FIGURES,
    output:
        touch(DVC_DONE),
    params:
        commit=DVC_COMMIT,
    log:
        logs("dvc_commit.log"),
    benchmark:
        logs("benchmarks/dvc_commit.tsv")
    threads: 1
    resources:
        mem_mb=1000,
        gpu=0,
    conda:
        "../envs/cpu.yaml"
    shell:
        "if [ ! -d .dvc ]; then echo 'not a DVC repository: skipped dvc commit' > {log}; "
        "elif [ {params.commit} = False ]; then "
        "echo 'skipped dvc commit: --config/--configfile changed knobs or the scale, dvc.lock records "
        "params.yaml' > {log}; "
        "else vmddpm config dvc --check > {log} 2>&1 && dvc commit --force --quiet >> {log} 2>&1; fi"


if MOVED_RESULTS:

    # The committed inputs of the report, copied from the repository's results/ when the scale's overlay
    # writes results elsewhere (showcase): the paper's numbers and the scaling benchmark.
    rule committed_input:
        input:
            f"{HOME_RESULTS}/{{name}}",
        output:
            f"{rel(CFG.results_dir())}/{{name}}",
        wildcard_constraints:
            name="paper/reference.csv|benchmarks/scaling.json",
        log:
            logs("committed_input/{name}.log"),
        threads: 1
        resources:
            mem_mb=100,
            gpu=0,
        conda:
            "../envs/cpu.yaml"
        shell:
            "cp {input} {output} 2> {log}"
