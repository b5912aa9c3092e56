"""The clinical evaluation (jobs/eval.py), the paper's four task families plus safety:

    items    the test records each family reads, and the models' answers from vLLM rollout engines
    metrics  conversation metrics, exam answer extraction and categories, diagnosis matching, verdicts
    judges   the judges of the pairwise families: the reward model, or an OpenAI-compatible endpoint
    scoring  the answers scored per family and model
    report   the Markdown report and the charts
    run      evaluate(): all of the above, writing the outputs
"""
