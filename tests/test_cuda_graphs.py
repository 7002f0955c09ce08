"""training/cuda_graphs.py: decoder layers replayed as CUDA graphs train exactly as the layers themselves do.

On the CPU, torch.cuda.make_graphed_callables is stood in for by one that hands the layer calls back as they are, so
everything around the graphs (when a call takes them, the gradients, the release) runs in CI; the `gpu` runs capture
real graphs.
"""

import copy

import pytest

from conftest import MINIMAL_CASE, recipe_trainer
from game.scenario import Case
from training.cuda_graphs import GraphedLayers, fixed_length, sdpa_attention
from training.data import case_chats

CASE = Case.model_validate(MINIMAL_CASE)


def as_they_are(calls, samples):
    as_they_are.samples = samples
    return calls


def tiny_lora(device: str, attention: str = "sdpa"):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, use_cache=False, attn_implementation=attention)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                                init_lora_weights=False))
    return model.to(device).train()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_graphed_layers_give_the_layers_own_losses_and_gradients(device):
    import torch

    eager = tiny_lora(device)
    graphed = copy.deepcopy(eager)
    layers = graphed.get_base_model().model.layers
    keys = list(graphed.state_dict())
    graphs = GraphedLayers(layers, make_graphed=as_they_are if device == "cpu" else None)
    ids = torch.randint(0, 100, (2, 8), device=device)
    mask = torch.ones(2, 8, dtype=torch.long, device=device)
    mask[1, 6:] = 0  # padding: the layers get a mask, as every recipe batch does

    def step(model):
        losses = []
        for _ in range(2):  # two batches accumulated, then an update the next passes must see
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            losses.append(loss.item())
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p -= 0.5 * p.grad
                    p.grad = None
        return losses, grads

    for _ in range(2):
        (eager_losses, eager_grads), (graphed_losses, graphed_grads) = step(eager), step(graphed)
        assert graphed_losses == pytest.approx(eager_losses, rel=1e-5)
        assert all(torch.allclose(g, e, rtol=1e-4, atol=1e-6) for g, e in zip(graphed_grads, eager_grads))
    assert graphs.replays == 4  # captured once, at the first call, for every one after it
    if device == "cpu":  # the first layer's input comes from the frozen embedding; the others' from LoRA layers
        assert [sample[0].requires_grad for sample in as_they_are.samples] == [False, True, True]

    replays = graphs.replays
    graphed.eval()
    with torch.no_grad():  # evaluation and generation run the layers as they are
        assert torch.allclose(graphed(input_ids=ids).logits, eager.eval()(input_ids=ids).logits, atol=1e-5)
    graphed.train()
    unpadded = graphed(input_ids=ids, labels=ids).loss  # no padding, no mask: the causal one, the same graphs
    unpadded.backward()
    assert unpadded.item() == pytest.approx(eager.train()(input_ids=ids, labels=ids).loss.item(), rel=1e-5)
    assert graphs.replays == replays + 1
    graphed(input_ids=ids[1:], attention_mask=mask[1:], labels=ids[1:]).loss.backward()  # another batch shape
    assert graphs.replays == replays + 1
    graphs.release()
    assert not any("forward" in vars(layer) for layer in layers) and list(graphed.state_dict()) == keys


def test_only_sdpa_gets_a_boolean_causal_mask_for_an_unpadded_batch():
    """eager attention adds its mask to the scores, and transformers hands it a float one for every batch: the graphs
    replay with that, no boolean mask put in, and give the layers' own losses."""
    import torch

    eager = tiny_lora("cpu", attention="eager")
    graphed = copy.deepcopy(eager)
    layers = graphed.get_base_model().model.layers
    graphs = GraphedLayers(layers, make_graphed=as_they_are)
    assert not sdpa_attention(layers[0]) and sdpa_attention(tiny_lora("cpu").get_base_model().model.layers[0])
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    for attention_mask in (mask, None):
        loss = graphed(input_ids=ids, attention_mask=attention_mask, labels=ids).loss
        assert loss.item() == pytest.approx(eager(input_ids=ids, attention_mask=attention_mask, labels=ids).loss.item(),
                                            rel=1e-5)
    assert graphs.replays == 2 and not graphs.masks and as_they_are.samples[0][1].dtype != torch.bool


def test_the_recipe_pads_every_batch_to_one_length_and_replays_each_step(base, tmp_path, monkeypatch, caplog):
    """make_trainer with CUDA-graph layers, run on the CPU: every batch the length of the longest chat (rounded to 64),
    every step through the graphed calls, the layers given back when training ends."""
    import torch

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", as_they_are)
    chats = case_chats(CASE, 4, seed=5, min_turns=1, max_turns=2)
    trainer = recipe_trainer(base, tmp_path, chats, "--steps", "2", "--batch_size", "2", "--min_turns", "1",
                             "--max_turns", "2", "--logging_steps", "1", "--save_steps", "100", compile="captured")
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    assert len(set(lengths)) > 1 and fixed_length(lengths) % 64 == 0 and fixed_length(lengths) >= max(lengths)
    batch = trainer.data_collator([trainer.train_dataset[lengths.index(min(lengths))]])
    assert batch["input_ids"].shape[1] == fixed_length(lengths)
    layers = trainer.model.get_base_model().model.layers
    assert all("forward" in vars(layer) for layer in layers)
    with caplog.at_level("INFO", logger="training"):
        trainer.train()
    assert "replayed as CUDA graphs in 2 of 2 steps' batches" in caplog.text
    assert len(as_they_are.samples) == len(layers)
    assert all(sample[0].shape[1] == fixed_length(lengths) for sample in as_they_are.samples)
    assert not any("forward" in vars(layer) for layer in layers)  # given back once training ended


def test_fixed_length_is_the_longest_rounded_up():
    assert fixed_length([3, 64]) == 64 and fixed_length([65, 10]) == 128 and fixed_length([700], multiple=8) == 704
