"""Auto-tuning of a rendered repository, in the spirit of Triton's Model Analyzer (`edgestack tune`).

    space.py    the search space: detector instances x intra-op threads x dynamic batching (max batch size,
                queue delay) x preprocess/postprocess instances, as target overrides (builder.targets)
    measure.py  a closed-loop load generator and the search loop; the caller serves each candidate (starting
                tritonserver is the CLI's job: builder imports nothing above it)
    select.py   the objectives: latency at concurrency 1, throughput under a p99 SLO, or balanced (closest to
                the best at every concurrency measured)
    report.py   the table of what was tried, Markdown and JSON
"""
