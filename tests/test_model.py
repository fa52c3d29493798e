"""
Lesson: our from-scratch model.py computes the same functions as the reference implementations.

Each test builds a small random model with `transformers` (or `peft`), saves it as a Hugging Face
checkpoint in tmp_path, loads it with our own loader (explicit name table, raw safetensors), and
compares outputs in fp32. The measured max |difference| of every pair is printed at the end of the run.

Run:  python -m pytest tests/test_model.py
"""
import json

import pytest
import torch

import model
import weights
from model import Projector, WhisperEncoder

transformers = pytest.importorskip("transformers")


# -----------------------------------------------------------------------------
# Small reference checkpoints written by transformers

def hf_whisper(tmp_path, max_source_positions=100):
    cfg = transformers.WhisperConfig(
        num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128, vocab_size=100, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=3,
        max_source_positions=max_source_positions, max_target_positions=32)
    ref = transformers.WhisperForConditionalGeneration(cfg).eval()
    ref.save_pretrained(tmp_path / "whisper")
    return ref, tmp_path / "whisper"


def hf_llama(tmp_path, tied=True, n_kv_heads=2, rope_theta=10000.0, name="llama"):
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, rope_theta=rope_theta, rms_norm_eps=1e-5, max_position_embeddings=256,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path / name)
    return ref, tmp_path / name


# -----------------------------------------------------------------------------
# Audio front end and encoder

def test_log_mel_matches_whisper_feature_extractor(parity):
    audio = torch.randn(3 * model.SAMPLE_RATE) * 0.1
    fe = transformers.WhisperFeatureExtractor(feature_size=80)
    ref = fe(audio.numpy(), sampling_rate=16000, return_tensors="pt").input_features[0]   # padded to 30 s
    ours = model.log_mel_spectrogram(torch.nn.functional.pad(audio, (0, model.N_SAMPLES - audio.numel())))
    assert ours.shape == ref.shape == (80, model.N_FRAMES)
    parity("log_mel_spectrogram vs WhisperFeatureExtractor", ours, ref, 1e-4)
    batch = model.log_mel_spectrogram(torch.stack([audio, audio * 0.5]))     # (B, samples) works too
    assert batch.shape == (2, 80, audio.numel() // model.HOP_LENGTH)


def test_whisper_encoder_matches_transformers(tmp_path, parity):
    ref, path = hf_whisper(tmp_path)
    ours = weights.load_whisper_encoder(path)
    mel = torch.randn(2, 80, 200)          # transformers insists on exactly 2 * max_source_positions frames
    with torch.no_grad():
        expected = ref.model.encoder(mel).last_hidden_state
        parity("WhisperEncoder vs transformers (sdpa)", ours(mel), expected, 1e-4)
        manual = weights.load_whisper_encoder(path, attention="manual")
        parity("WhisperEncoder manual attention vs sdpa", manual(mel), ours(mel), 1e-5)


def test_whisper_encoder_short_audio_and_padding(tmp_path, parity):
    """Ultravox's way: encode only the real frames. A clip padded inside a batch (with mel_lengths)
    gives exactly its lone output; Whisper's way (pad to 30 s) gives the full 1500-frame output."""
    _, path = hf_whisper(tmp_path, max_source_positions=1500)
    enc = weights.load_whisper_encoder(path)
    short, longer = torch.randn(80, 137), torch.randn(80, 300)
    batch = torch.zeros(2, 80, 300)
    batch[0, :, :137], batch[1] = short, longer
    with torch.no_grad():
        alone = enc(short[None])                                   # (1, 69, 64): ceil(137 / 2)
        padded = enc(batch, mel_lengths=torch.tensor([137, 300]))
        assert alone.shape[1] == WhisperEncoder.output_length(137) == 69
        parity("encoder: clip alone vs padded in a batch (masked)", padded[0, :69], alone[0], 1e-5)
        full = enc(torch.zeros(1, 80, model.N_FRAMES))
    assert full.shape == (1, 1500, 64)
    with pytest.raises(ValueError, match="30 s"):
        enc(torch.zeros(1, 80, model.N_FRAMES + 2))


@pytest.mark.parametrize("kind", ["mlp", "stack_swiglu"])
def test_projector_token_count_is_exact(kind):
    proj = Projector(kind, d_audio=8, d_llm=16, stack=4, hidden=32)
    for frames in [1, 3, 4, 5, 8, 69, 1500]:
        out = proj(torch.randn(2, frames, 8))
        assert out.shape == (2, proj.audio_token_count(frames), 16)
        assert proj.audio_token_count(frames) == -(-frames // 4)


# -----------------------------------------------------------------------------
# Llama

@pytest.mark.parametrize("tied,n_kv_heads,theta", [(True, 2, 10000.0), (False, 2, 5e6), (False, 4, 1e5)])
def test_llama_matches_transformers(tmp_path, parity, tied, n_kv_heads, theta):
    ref, path = hf_llama(tmp_path, tied=tied, n_kv_heads=n_kv_heads, rope_theta=theta)
    ours = weights.load_llm(path)
    assert ours.cfg.tie_embeddings == tied and (ours.lm_head.weight is ours.embed_tokens.weight) == tied
    ids = torch.randint(0, 128, (2, 33))
    with torch.no_grad():
        name = f"Llama vs LlamaForCausalLM (tied={tied}, kv_heads={n_kv_heads}, theta={theta:g})"
        parity(name, ours(ids), ref(ids).logits, 1e-4)
        embeds = ours.embed_tokens(ids)
        parity("Llama inputs_embeds vs input_ids", ours(inputs_embeds=embeds), ours(ids), 1e-6)


def test_manual_attention_equals_sdpa(tmp_path, parity):
    _, path = hf_llama(tmp_path)
    fast, slow = weights.load_llm(path), weights.load_llm(path, attention="manual")
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        parity("Llama manual attention vs sdpa", slow(ids), fast(ids), 1e-5)


def test_kv_cache_decoding_equals_full_forward(tmp_path, parity):
    _, path = hf_llama(tmp_path)
    llm = weights.load_llm(path)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        full = llm(ids)
        cache = model.KVCache(llm.cfg, 2, 24, "cpu", torch.float32)
        steps = [llm(ids[:, :10], kv_cache=cache)]                       # a 10-token prefix ...
        steps += [llm(ids[:, 10:13], kv_cache=cache)]                    # ... a 3-token chunk ...
        steps += [llm(ids[:, t:t + 1], kv_cache=cache) for t in range(13, 24)]   # ... then one at a time
    parity("KV-cache decoding vs full forward", torch.cat(steps, dim=1), full, 1e-5)


def test_generate_greedy_eos_and_streaming(tmp_path):
    _, path = hf_llama(tmp_path)
    llm = weights.load_llm(path)
    prompt = torch.randint(0, 128, (1, 5))
    streamed = []
    out = llm.generate(prompt, max_new_tokens=8, callback=lambda t: streamed.append(t.item()))
    ids = prompt
    for _ in range(8):                          # the slow way: full forward, argmax, append
        ids = torch.cat([ids, llm(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out[0].tolist() == ids[0, 5:].tolist() == streamed
    first = out[0].tolist()
    k = max(i for i in range(8) if first[i] not in first[:i])   # the last token that is new in the output
    stopped = llm.generate(prompt, max_new_tokens=8, eos_id=first[k])   # pretend it is end-of-sequence
    assert stopped[0].tolist() == first[:k + 1]
    # rows decode side by side as each would alone; a row that has ended is padded with eos_id
    other = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    both = llm.generate(torch.cat([prompt, other]), max_new_tokens=8, eos_id=first[k])
    alone = llm.generate(other, max_new_tokens=8, eos_id=first[k])
    assert both[0].tolist()[: k + 1] == first[: k + 1] and set(both[0].tolist()[k + 1:]) <= {first[k]}
    assert both[1].tolist()[: alone.size(1)] == alone[0].tolist()
    sampled = llm.generate(prompt, max_new_tokens=4, temperature=1.0, top_k=1)   # top-1 sampling = greedy
    assert sampled[0].tolist() == out[0, :4].tolist()


# -----------------------------------------------------------------------------
# Loading errors name the tensor

def test_loader_errors_name_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    _, path = hf_llama(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    bad = dict(tensors)
    bad["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(bad, str(path / "model.safetensors"))
    with pytest.raises(weights.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape \(3, 3\)"):
        weights.load_llm(path)
    missing = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    save_file(missing, str(path / "model.safetensors"))
    with pytest.raises(weights.CheckpointError, match=r"model\.norm\.weight is missing"):
        weights.load_llm(path)
    save_file({**tensors, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, str(path / "model.safetensors"))
    with pytest.raises(weights.CheckpointError, match=r"q_norm\.weight has no place"):
        weights.load_llm(path)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(weights.CheckpointError, match="missing weight file"):
        weights.load_llm(path)
    with pytest.raises(weights.CheckpointError, match="scripts/offline_weights.py"):
        weights.resolve_checkpoint("no-such-org/no-such-model", root=str(tmp_path))
    whisper = weights.write_tiny_checkpoint("whisper", tmp_path / "whisper")
    with pytest.raises(weights.CheckpointError, match="this is a whisper checkpoint, not a Llama-family one"):
        weights.load_llm(whisper)


def test_sharded_checkpoint_loads(tmp_path, parity):
    ref, path = hf_llama(tmp_path, tied=False)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        parity("Llama from a sharded checkpoint", weights.load_llm(tmp_path / "sharded")(ids), ref(ids).logits, 1e-4)


def test_tiny_checkpoints_round_trip(tmp_path, parity):
    """The tiny preset's random checkpoints are real HF checkpoints: transformers reads them too."""
    path = weights.write_tiny_checkpoint("llama", tmp_path / "tiny-llama")
    ours = weights.load_llm(path)
    ref = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        parity("tiny:llama, ours vs transformers", ours(ids), ref(ids).logits, 1e-4)
    tok = weights.Tokenizer(path)
    assert tok.decode(tok.encode("héllo 42")) == "héllo 42"
    assert tok.encode("<|im_start|>") == [257] and tok.chatml and tok.end_of_turn_id == 258
    enc = weights.load_whisper_encoder(weights.write_tiny_checkpoint("whisper", tmp_path / "tiny-whisper"))
    assert enc(torch.randn(1, 80, 50)).shape == (1, 25, 64)


def test_sentencepiece_tokenizer_and_plain_template(tmp_path):
    """A base model without ChatML tokens (e.g. Sarvam-2B) gets a plain "User: ... Assistant:" template,
    its tokenizer read from tokenizer.model (sentencepiece)."""
    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(["turn on the lights", "what is seven plus two", "the sky is blue"] * 50))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "tokenizer"), vocab_size=24,
                                   minloglevel=2)
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tok = weights.Tokenizer(tmp_path)
    assert tok.decode(tok.encode("turn on the sky")) == "turn on the sky"
    assert not tok.chatml and tok.end_of_turn_id == tok.eos_id == 2
    assert tok.chat_prompt("hi") == "User: hi\nAssistant:"
