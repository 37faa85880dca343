"""Reusable operators of the stages, each a Ray Data callable (an actor holding a model, or a plain function) and
the function that maps it over a dataset:

- `samplers`: completions of prompts (transformers or vLLM);
- `scorers`: summed completion log-probs under a model, and the reference cache;
- `rewards`: the labelers (sentiment lexicons, reward model, implicit reward, LLM judge: `judge`) behind one
  interface;
- `prompts`: the user's prompts validated and split into train and held-out;
- `kl_budget`: the checkpoint a KL budget keeps;
- `datasets`: grouping by prompt and summing statistics columns, shared by the above and the stages.

Stages import these, never each other. An actor receives a small frozen spec of what it reads, built from the
validated config in the driver.
"""
