# FID against the number of DDIM sampling steps (eval.ddim_steps_sweep): samples each step count with
# the sample stage's code and seeds into ddim_sweep/steps_<k>/, evaluates it against the cached reference
# features, writes ddim_sweep.json for the report. A GAN's sweep file says "not applicable"; an empty
# eval.ddim_steps_sweep makes every sweep file say so (no sampling).
rule sweep:
    input:
        train=lambda w: train_dir(w.dataset, w.model),
        reference=lambda w: prepared(w.dataset),
    output:
        sweep=sweep_json("{dataset}", "{model}"),
        samples=directory(sweep_dir("{dataset}", "{model}")),
    params:
        cli=cli,
        knobs=knobs("sweep"),
    log:
        logs("sweep/{dataset}/{model}.log"),
    benchmark:
        logs("benchmarks/sweep/{dataset}/{model}.tsv")
    threads: 8 if SCALE == "paper" else 1
    resources:
        mem_mb=4000,
        gpu=lambda w: gpu(1),
    conda:
        "../envs/cuda.yaml" if SCALE == "paper" else "../envs/cpu.yaml"
    shell:
        "{params.cli} sweep --dataset {wildcards.dataset} --model {wildcards.model} > {log} 2>&1"
