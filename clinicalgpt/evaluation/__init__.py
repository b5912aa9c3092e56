"""The clinical evaluation (jobs/eval.py), the paper's four task families plus safety and bias:

    items    the items each family reads, the candidates (local models, endpoints) and their answers, saved a chunk
             at a time so that a rerun resumes
    metrics  conversation metrics, exam answer extraction and categories, diagnosis matching, verdicts, intervals
    bias     the attitude-scale items, reading an answer's scale point, attitude scores
    judges   the judges of the pairwise families: the reward model, or an OpenAI-compatible endpoint (cached)
    scoring  the answers scored per family and candidate
    report   the Markdown report and the charts
    run      evaluate(): all of the above, writing the outputs
"""
