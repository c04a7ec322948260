# The train folder is the rule's output. Snakemake deletes it before the job runs and after it fails, so
# the step checkpoints a rerun resumes from live beside it, in runs/<dataset>/<model>/checkpoints/
# (vmddpm.trainkit), which no rule declares: a job ended by Ctrl-C, a crash or a SLURM time limit is
# resumed by the next `snakemake` (with --rerun-incomplete, as both profiles set) from its last step.
rule train:
    input:
        lambda w: prepared(w.dataset),
    output:
        directory(train_dir("{dataset}", "{model}")),
    params:
        knobs=knobs("train"),
        # derived (it takes `resources`), so no rerun trigger; the `knobs` param is
        launcher=lambda w, threads, resources: (
            f"torchrun --standalone --nproc_per_node {resources.gpu} -m {CLI}" if resources.gpu > 1 else CLI
        ),
    log:
        logs("train/{dataset}/{model}.log"),
    benchmark:
        logs("benchmarks/train/{dataset}/{model}.tsv")
    threads: 8 if SCALE == "paper" else 1
    resources:
        mem_mb=lambda w: 8000 if SCALE == "paper" else 3000,
        gpu=lambda w: gpu(1),
        runtime=lambda w: TRAIN_MINUTES,
    conda:
        "../envs/cuda.yaml" if SCALE == "paper" else "../envs/cpu.yaml"
    shell:
        "{params.launcher} train"
        " --dataset {wildcards.dataset} --model {wildcards.model} > {log} 2>&1"
