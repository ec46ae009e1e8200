# Slide lists of a cohort (one path a line), read by cohort rules as `@results/lists/{cohort}/{kind}.txt`.


rule cohort_list:
    output:
        "results/lists/{cohort}/{kind}.txt",
    params:
        paths=lambda wildcards: cohort_paths(wildcards.cohort, wildcards.kind),
    wildcard_constraints:
        kind="|".join(LIST_KINDS),
    log:
        "results/lists/{cohort}/{kind}.log",
    localrule: True
    run:
        from stmdit.provenance import write_lines

        write_lines(output[0], params.paths)
        Path(log[0]).write_text(f"{len(params.paths)} paths\n")
