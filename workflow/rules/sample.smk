rule sample:
    input:
        train=lambda w: train_dir(w.dataset, w.model),
        reference=lambda w: prepared(w.dataset),
    output:
        samples=directory(samples_dir("{dataset}", "{model}")),
        grid=samples_grid("{dataset}", "{model}"),
        meta=samples_meta("{dataset}", "{model}"),
    params:
        cli=cli,
        knobs=knobs("sample"),
    log:
        logs("sample/{dataset}/{model}.log"),
    benchmark:
        logs("benchmarks/sample/{dataset}/{model}.tsv")
    threads: 8 if SCALE == "paper" else 1
    resources:
        mem_mb=3000,
        gpu=lambda w: gpu(1),
    conda:
        "../envs/cuda.yaml" if SCALE == "paper" else "../envs/cpu.yaml"
    shell:
        "{params.cli} sample --dataset {wildcards.dataset} --model {wildcards.model} > {log} 2>&1"
