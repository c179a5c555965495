"""Train a PaRa network on a tiny diffusers UNet + CLIP text encoder the way sd-scripts' train_network.py does, in one
or several processes (torchrun), and write each rank's B and losses (``OUT/rank<R>.safetensors``).

What is sd-scripts' (train_network.py, NetworkTrainer.train): the network comes from `create_network`, `apply_to`,
`prepare_optimizer_params`; the frozen UNet and the trained text encoder are passed to `accelerator.prepare` one by
one, then ``accelerator.prepare(network, optimizer, dataloader)``; every step runs under
``accelerator.accumulate(network)``, ``accelerator.backward(loss)``, then, when gradients sync, sd-scripts' own
`NetworkTrainer.all_reduce_network` (imported from sd-scripts, not copied) and `clip_grad_norm_`, then the
optimizer step. What is simplified: the model is tiny (so a CPU runs several processes), the data are fixed latents,
noise, timesteps and token ids per sample (so a sample's loss does not depend on which process draws it), and the
loss is ε-MSE. On CPU the accelerate shim (cpu_ddp_shim.py) is installed: see there for why.

    python ddp_driver.py OUT --batch 2                         # one process
    torchrun --nproc_per_node 2 ddp_driver.py OUT --batch 1    # two processes, the same global batch
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

KOHYA = os.environ["KOHYA_PATH"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [KOHYA, REPO, os.path.dirname(os.path.abspath(__file__))]

N_SAMPLES, TOKENS = 8, 8


def tiny_models():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=TOKENS))
    return unet.requires_grad_(False), te.requires_grad_(False)


def dataset():
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(N_SAMPLES, 4, 8, 8, generator=g)
    noise = torch.randn(N_SAMPLES, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (N_SAMPLES,), generator=g)
    ids = torch.randint(0, 100, (N_SAMPLES, TOKENS), generator=g)
    return torch.utils.data.TensorDataset(latents, noise, t, ids)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, required=True, help="per-process batch size")
    ap.add_argument("--no-sync", action="store_true", help="skip all_reduce_network (a control: ranks must then differ)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"),
                    help="sgd (default): B after N steps is a smooth function of the gradients, so agreement is "
                         "judged at fp32 rounding; Adam's g/(|g|+eps) turns rounding-level differences of near-zero "
                         "gradients into O(lr) steps")
    a = ap.parse_args()

    from accelerate import Accelerator
    from safetensors.torch import save_file

    import cpu_ddp_shim
    from para_core import kohya
    from train_network import NetworkTrainer
    if a.device == "cpu":
        cpu_ddp_shim.install()
    else:  # fp32 means fp32 on GPUs too: no TF32 in convs (cuDNN's default) or matmuls
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    handlers = []
    backend = os.environ.get("PARA_KOHYA_DDP_BACKEND")  # gpu_check.sh on 1 GPU: gloo (accelerate's default: nccl)
    if backend and "LOCAL_RANK" in os.environ:  # under torchrun only: a backend given makes accelerate 1.6 assume a
        # process group even in a single process (PartialState asks torch.distributed for the world size)
        from accelerate.utils import InitProcessGroupKwargs
        handlers.append(InitProcessGroupKwargs(backend=backend))
        if a.device != "cpu":
            # ranks share the GPUs (accelerate puts rank r on cuda:r % count, NCCL refuses two ranks on one GPU,
            # gloo does not), but accelerate's DDP wrap pins device_ids=[rank], a GPU rank 1 does not have on a
            # 1-GPU machine; with this accelerate leaves device_ids unset and DDP takes the module's own device
            os.environ["ACCELERATE_BYPASS_DEVICE_MAP"] = "true"
    accelerator = Accelerator(cpu=a.device == "cpu", kwargs_handlers=handlers)
    unet, te = tiny_models()
    network = kohya.create_network(1.0, 4, 1.0, None, te, unet, targets="ExCA", rank_boundary="0",
                                   projection="output", init="small_sv")
    network.apply_to(te, unet, True, True)
    lr = 1e-2 if a.optimizer == "adamw" else 1.0
    params, _ = network.prepare_optimizer_params(lr / 5, lr, lr)  # text encoder lr, unet lr, default
    optimizer = torch.optim.SGD(params, lr=lr) if a.optimizer == "sgd" else torch.optim.AdamW(params, lr=lr)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=a.batch, shuffle=False)

    unet = accelerator.prepare(unet)  # NetworkTrainer.prepare_unet_with_accelerator
    te = accelerator.prepare(te)  # train_text_encoder: each trained text encoder is prepared
    network, optimizer, loader = accelerator.prepare(network, optimizer, loader)
    accelerator.unwrap_model(network).prepare_grad_etc(te, unet)
    accelerator.unwrap_model(network).on_epoch_start(te, unet)
    unet.train()
    te.train()
    alphas = torch.linspace(0.999, 0.01, 1000)
    losses, first_grads = [], {}
    b0 = {n: layer.b.detach().cpu().clone() for n, layer in accelerator.unwrap_model(network).para.items()}
    for latents, noise, t, ids in loader:
        with accelerator.accumulate(network):
            a_t = alphas.to(latents.device)[t].view(-1, 1, 1, 1)
            noisy = a_t.sqrt() * latents + (1 - a_t).sqrt() * noise
            cond = te(ids)[0]
            pred = unet(noisy, t, cond).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            accelerator.backward(loss)
            if accelerator.sync_gradients and not a.no_sync:
                NetworkTrainer.all_reduce_network(None, accelerator, network)  # sd-scripts' "sync DDP grad manually"
                accelerator.clip_grad_norm_(accelerator.unwrap_model(network).get_trainable_params(), 1.0)
            if not first_grads:  # the gradients the optimizer sees at step 1 (after the sync)
                first_grads = {n: layer.b.grad.detach().cpu().clone() for n, layer in accelerator.unwrap_model(network).para.items()}
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(float(accelerator.reduce(loss.detach(), reduction="mean")))
    net = accelerator.unwrap_model(network)
    out = {f"b.{n}": layer.b.detach().cpu().contiguous() for n, layer in net.para.items()}
    out.update({f"grad.{n}": g for n, g in first_grads.items()})
    out.update({f"b0.{n}": b for n, b in b0.items()})
    out["losses"] = torch.tensor(losses, dtype=torch.float64)
    os.makedirs(a.out, exist_ok=True)
    save_file(out, os.path.join(a.out, f"rank{accelerator.process_index}.safetensors"),
              {"world_size": str(accelerator.num_processes), "distributed_type": str(accelerator.distributed_type)})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        net.save_weights(os.path.join(a.out, "para.safetensors"), torch.float32, {"ss_network_module": "para_core.kohya"})
    accelerator.end_training()


if __name__ == "__main__":
    main()
