"""PPO over Ray actor roles (actors/): the pieces of the controller that jobs/ppo.py runs.

    prompts     the prompt stream (Ray Data) and the held-out prompts
    roles       the roles started together; RolloutGroup: the engines and the weight-version protocol
    step        one PPO step (generate, score, advantages, learner epochs, weight push); held-out reward
    checkpoint  checkpoints of the learners and the controller
    log         per-step metrics (console, history.jsonl, TensorBoard, Prometheus) and the summary
    train       the run: inputs checked, roles started or resumed, steps, recovery, export

The pure pieces they use live beside: the RL math and its registries in clinicalgpt/rl.py, batches in
clinicalgpt/experience.py, reward functions in clinicalgpt/reward_functions.py.
"""
