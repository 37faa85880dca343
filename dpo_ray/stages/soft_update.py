"""soft_update: TR-DPO's reference between rounds (Gorbatovski et al., 2024, arXiv 2404.09656).

With `rounds.reference: soft`, round k's reference is round k-1's reference moved toward round k-1's policy,
alpha*policy + (1-alpha)*reference weight by weight (`rounds.reference_alpha`; 1 is `previous`, the policy itself).
The blend is a model folder of its own (safetensors, with the policy's tokenizer), published like any stage, so its
fingerprint, and with it the reference cache folder (ops/scorers.ReferenceCache), differs from every model it
was blended from: no log-prob of another reference is ever reused for it.

Inputs: the `policy` source (round k-1's trained policy folder) and `model.reference` of round k-1's config.
"""

from __future__ import annotations

from dpo_ray.config import PipelineConfig
from dpo_ray.models import blend_weights, load_causal_lm, load_tokenizer, model_fingerprint
from dpo_ray.runner import StageContext

SOURCES = {"policy": True}


def inputs(cfg: PipelineConfig, digests: dict[str, str]) -> dict:
    return {"policy": digests["policy"], "reference": model_fingerprint(cfg.reference_model),
            "alpha": cfg.rounds.reference_alpha}


def run(ctx: StageContext) -> dict:
    cfg, policy_path = ctx.cfg, str(ctx.sources["policy"])
    trust = cfg.model.trust_remote_code
    # fp32 whatever model.dtype says: the blend is new weights, and rounding them to bf16 would move them again.
    reference = load_causal_lm(cfg.reference_model, "float32", trust_remote_code=trust)
    policy = load_causal_lm(policy_path, "float32", trust_remote_code=trust)
    reference.load_state_dict(blend_weights(reference.state_dict(), policy.state_dict(),
                                            cfg.rounds.reference_alpha))
    reference.save_pretrained(ctx.out, safe_serialization=True)
    load_tokenizer(policy_path, trust).save_pretrained(ctx.out)
    return {"alpha": cfg.rounds.reference_alpha,
            "parameters": sum(p.numel() for p in reference.parameters())}
