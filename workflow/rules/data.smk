rule download:
    output:
        directory(raw("{dataset}")),
    params:
        cli=cli,
        knobs=knobs("download"),
    log:
        logs("download/{dataset}.log"),
    benchmark:
        logs("benchmarks/download/{dataset}.tsv")
    threads: 1
    resources:
        mem_mb=2000,
        gpu=0,
    conda:
        "../envs/cpu.yaml"
    shell:
        "{params.cli} download --dataset {wildcards.dataset} > {log} 2>&1"


rule prepare:
    input:
        lambda w: raw(w.dataset),
    output:
        directory(prepared("{dataset}")),
    params:
        cli=cli,
        knobs=knobs("prepare"),
    log:
        logs("prepare/{dataset}.log"),
    benchmark:
        logs("benchmarks/prepare/{dataset}.tsv")
    threads: 1
    resources:
        mem_mb=4000,
        gpu=0,
    conda:
        "../envs/cpu.yaml"
    shell:
        "{params.cli} prepare --dataset {wildcards.dataset} > {log} 2>&1"
