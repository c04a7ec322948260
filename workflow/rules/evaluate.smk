rule evaluate:
    input:
        samples=lambda w: samples_dir(w.dataset, w.model),
        reference=lambda w: prepared(w.dataset),
    output:
        metrics=metrics("{dataset}", "{model}"),
        protocol=protocol("{dataset}", "{model}"),
    params:
        cli=cli,
        knobs=knobs("evaluate"),
    log:
        logs("evaluate/{dataset}/{model}.log"),
    benchmark:
        logs("benchmarks/evaluate/{dataset}/{model}.tsv")
    threads: 8 if SCALE == "paper" else 1
    resources:
        mem_mb=4000,
        gpu=lambda w: gpu(1),
    conda:
        "../envs/eval.yaml"
    shell:
        "{params.cli} evaluate --dataset {wildcards.dataset} --model {wildcards.model} > {log} 2>&1"
