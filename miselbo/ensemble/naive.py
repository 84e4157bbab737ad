"""The slow reference for `miselbo.ensemble.log_weights.Ensemble`: the ensemble's log-weights by S*S*L full
forward passes, one sample at a time (tests/test_ensemble.py compares the two; benchmarks/
eval_speed.py times both)."""
from __future__ import annotations

from typing import Sequence

import torch

from miselbo.nvae.distributions import reconstruction_loss
from miselbo.nvae.model import AutoEncoder


@torch.no_grad()
def naive_log_weights(members: Sequence[AutoEncoder], x: torch.Tensor, latents_pre: Sequence[torch.Tensor],
                      check_post=None) -> tuple[torch.Tensor, torch.Tensor]:
    """log_p [B, S, L], log_q [B, S, L, S] (float64, CPU) by S*S*L full forward passes, one sample at a
    time: the public MISELBO algorithm, except that foreign members' flows are inverted (the public
    code scored them at the wrong point).

    For source s and sample l: member s's full forward pass with its pre-flow draw
    latents_pre[g][:, s, l] gives log p(x, z) and log q_s; for every other member j, a full forward
    pass with z_pre = f_j^-1(z*) (j's inverse flows at the source's post-flow z*) gives log q_j.
    All members must score with the same decoder. check_post(g, reproduced, expected), if given,
    receives j's post-flow z and the source's (they should agree). For tests and benchmarks.
    """
    batch, num_members, num_samples = latents_pre[0].shape[:3]
    log_p = torch.zeros(batch, num_members, num_samples, dtype=torch.float64)
    log_q = torch.zeros(batch, num_members, num_samples, num_members, dtype=torch.float64)
    for source in range(num_members):
        for sample in range(num_samples):
            own = members[source].forward_detailed(x, z=[z[:, source, sample] for z in latents_pre])
            output = members[source].decoder_output(own.logits)
            recon = reconstruction_loss(output, x, members[source].crop_output)
            log_p[:, source, sample] = (-recon + own.log_p).double().cpu()
            log_q[:, source, sample, source] = own.log_q.double().cpu()
            post = [record.z_post for record in own.groups]
            for other in range(num_members):
                if other == source:
                    continue
                pre = [members[other].invert_flows(group, z)[0] for group, z in enumerate(post)]
                scored = members[other].forward_detailed(x, z=pre)
                if check_post is not None:
                    for group, record in enumerate(scored.groups):
                        check_post(group, record.z_post, post[group])
                log_q[:, source, sample, other] = scored.log_q.double().cpu()
    return log_p, log_q
