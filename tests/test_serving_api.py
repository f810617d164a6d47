"""`train.py serve` as a user runs it: a subprocess on 127.0.0.1, called with the official `openai`
client in strict validation mode. References: the same tiny model and adapters loaded apart in
this process and run with peft's `generate` (greedy)."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from cli_runner import ROOT
from conftest import model_cfg
from serving_harness import lively
from trainer.models import load_model

KEY = "sk-test-key"
BASE = "tiny-llama"


def _base(tokenizer):
    return lively(load_model(model_cfg(), tokenizer))


def _save_base(tokenizer, root: Path) -> str:
    """The served base: tiny-llama with livelier weights (see serving_harness.lively), as a folder."""
    _base(tokenizer).save_pretrained(root / "tiny-llama")
    tokenizer.save_pretrained(root / "tiny-llama")
    return str(root / "tiny-llama")


def _save_adapters(tokenizer, root: Path) -> dict[str, str]:
    folders = {}
    for i, (name, targets) in enumerate([("poet", ["q_proj", "v_proj"]), ("critic", ["k_proj", "o_proj", "up_proj"])]):
        base = _base(tokenizer)
        torch.manual_seed(10 + i)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
        model.save_pretrained(root / name)
        folders[name] = str(root / name)
    return folders


def _write_config(root: Path, tokenizer, adapters: dict, **extra) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny-lora.yaml").read_text())
    if not (root / "tiny-llama").is_dir():
        _save_base(tokenizer, root)
    cfg["model"]["name_or_path"] = str(root / "tiny-llama")
    cfg["data"].update(max_length=40, max_examples=40)
    cfg["adapter"]["dropout"] = 0.0
    cfg["train"].update(output_dir=str(root / "config-job"), max_steps=400, batch_size=2, save_every=2,
                        resume="auto", warmup_steps=0)
    cfg["serving"] = {"host": "127.0.0.1", "port": 0, "api_key": KEY, "adapters": adapters,
                      "jobs_dir": str(root / "jobs"), "publish_every": 2, "tpot_slo_ms": 200, "max_model_len": 256,
                      "shutdown_timeout_s": 20, **extra}
    path = root / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Server:
    def __init__(self, config: Path, *overrides: str):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "serve", "--config", str(config), *overrides],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        deadline = time.time() + 180
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError("the server exited:\n" + "".join(self.lines))
            self.lines.append(line)
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if found:
                self.url = found.group(1)
                break
        else:
            raise AssertionError("the server did not start:\n" + "".join(self.lines))

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, _strict_response_validation=True, max_retries=0, **kw)

    def aclient(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=KEY, _strict_response_validation=True, max_retries=0)

    def stop(self, timeout: float = 120) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, "".join(self.lines) + out


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("serve")
    adapters = _save_adapters(smollm2_tokenizer, root)
    server = Server(_write_config(root, smollm2_tokenizer, adapters))
    base = _base(smollm2_tokenizer)
    ref = PeftModel.from_pretrained(base, adapters["poet"], adapter_name="poet")
    ref.load_adapter(adapters["critic"], adapter_name="critic")
    yield server, ref.eval(), root
    code, log = server.stop()
    assert code == 0, log


def _greedy(ref, tokenizer, ids, model_id, n):
    adapter = {BASE: "__base__"}.get(model_id, model_id)
    ids = torch.tensor([ids])
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                           adapter_names=[adapter], pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _chat_ids(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


def test_models_completions_chat_and_streams(served, smollm2_tokenizer):
    server, ref, _ = served
    client = server.client()
    cards = {m.id: m for m in client.models.list().data}
    assert {BASE, "poet", "critic"} <= set(cards)
    assert cards["poet"].model_extra["parent"] == BASE and cards[BASE].model_extra["parent"] is None
    assert client.models.retrieve("critic").id == "critic"

    prompt = "The king said to the queen"
    done = client.completions.create(model="poet", prompt=prompt, max_tokens=9, temperature=0)
    want = _greedy(ref, smollm2_tokenizer, smollm2_tokenizer(prompt)["input_ids"], "poet", 9)
    assert done.choices[0].text == want and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 9 and done.usage.prompt_tokens == len(smollm2_tokenizer(prompt)["input_ids"])

    question = "Who are you?"
    chat = client.chat.completions.create(model="critic", messages=[{"role": "user", "content": question}],
                                          max_tokens=7, temperature=0)
    want = _greedy(ref, smollm2_tokenizer, _chat_ids(smollm2_tokenizer, question), "critic", 7)
    assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 7

    chunks = list(client.chat.completions.create(model="critic", messages=[{"role": "user", "content": question}],
                                                 max_tokens=7, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7

    stopped = client.completions.create(model=BASE, prompt=prompt, max_tokens=30, temperature=0, stop=["\n", " the"])
    full = _greedy(ref, smollm2_tokenizer, smollm2_tokenizer(prompt)["input_ids"], BASE, 30)
    cut = min([full.index(s) for s in ("\n", " the") if s in full], default=None)
    assert stopped.choices[0].text == (full[:cut] if cut is not None else full)
    assert stopped.choices[0].finish_reason == ("stop" if cut is not None else "length")

    # a completions stream: its chunks carry finish_reason null until the last, as OpenAI's do, which
    # the SDK's strict mode rejects (its Completion type declares the field always set); the default
    # (non-strict) client reads the stream
    with pytest.raises(openai.APIResponseValidationError):
        list(client.completions.create(model="poet", prompt=prompt, max_tokens=9, temperature=0, stream=True))
    relaxed = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    chunks = list(relaxed.completions.create(model="poet", prompt=prompt, max_tokens=9, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == _greedy(ref, smollm2_tokenizer,
                                                                 smollm2_tokenizer(prompt)["input_ids"], "poet", 9)
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"


def test_errors_have_openai_shape_and_status(served):
    server, _, _ = served
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=BASE, prompt="x", max_tokens=100000)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=BASE, messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}], n=2)
    assert e.value.param == "n"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    raw = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    raw = httpx.post(server.url + "/v1/completions", json={"model": BASE, "prompt": "x", "temperature": "hot"},
                     headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 400 and "temperature" in raw.json()["error"]["message"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_fine_tuning_job_publishes_an_adapter(served, smollm2_tokenizer):
    server, _, root = served
    client = server.client()
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps({"text": f"Question {i}: what is {i} plus {i}? Answer: {2 * i}."}) + "\n"
                            for i in range(40)))
    broken = root / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops}\n')
    bad = client.fine_tuning.jobs.create(model=BASE, training_file=str(broken))
    job = client.fine_tuning.jobs.create(model=BASE, training_file=str(data), hyperparameters={"batch_size": 2},
                                         suffix="qa", extra_body={"overrides": ["train.max_steps=4"]})
    assert job.status in ("queued", "validating_files", "running")
    for _ in range(600):
        bad, job = client.fine_tuning.jobs.retrieve(bad.id), client.fine_tuning.jobs.retrieve(job.id)
        if job.status in ("succeeded", "failed", "cancelled") and bad.status == "failed":
            break
        time.sleep(0.2)
    assert bad.status == "failed" and "broken.jsonl:2" in bad.error.message
    assert job.status == "succeeded", job
    assert job.fine_tuned_model == f"ft:{BASE}:qa:{job.id}" and job.trained_tokens > 0
    card = client.models.retrieve(job.fine_tuned_model)
    assert card.model_extra["parent"] == BASE and card.model_extra["version"] == 2 and card.model_extra["step"] == 4
    answer = client.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, temperature=0)
    assert answer.system_fingerprint == f"{job.fine_tuned_model}@v2"
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any("published" in m and "version 2" in m for m in events) and any("step 4/4" in m for m in events)
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=10).data]
    adapter = Path(job.model_extra["output_dir"]) / "adapter"
    # peft starts lora_B at zero: only gradients computed on the server's engine thread move it
    weights = load_file(adapter / "adapter_model.safetensors")
    assert max(float(w.abs().max()) for k, w in weights.items() if "lora_B" in k) > 0

    long = client.fine_tuning.jobs.create(model=BASE, training_file=str(data),
                                          extra_body={"overrides": ["train.max_steps=100000"]})
    for _ in range(300):
        if client.fine_tuning.jobs.retrieve(long.id).status == "running":
            break
        time.sleep(0.1)
    cancelled = client.fine_tuning.jobs.cancel(long.id)
    assert cancelled.status == "cancelled"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="nope", training_file=str(data))
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(model=BASE, training_file=str(root / "missing.jsonl"))


def test_concurrent_clients_while_a_job_trains(served, smollm2_tokenizer):
    """24 concurrent requests (streaming and not, three models) while a job trains: every answer is
    the reference answer for its own prompt and model: none lost, none mixed up."""
    server, ref, root = served
    client = server.client()
    job = client.fine_tuning.jobs.create(model=BASE, training_file="packaged:hamlet",
                                         extra_body={"overrides": ["train.max_steps=100000"]})
    for _ in range(300):
        if client.fine_tuning.jobs.retrieve(job.id).status == "running":
            break
        time.sleep(0.1)
    cases = [(["poet", "critic", BASE][i % 3], f"Client {i} writes: {'la ' * (i % 5)}", 4 + i % 6, i % 2 == 0)
             for i in range(24)]

    async def one(strict, model, prompt, n, stream):
        messages = [{"role": "user", "content": prompt}]
        if stream:
            text = ""
            async for c in await strict.chat.completions.create(model=model, messages=messages, max_tokens=n,
                                                                temperature=0, stream=True):
                text += c.choices[0].delta.content or "" if c.choices else ""
            return text
        done = await strict.chat.completions.create(model=model, messages=messages, max_tokens=n, temperature=0)
        return done.choices[0].message.content

    async def everyone():
        strict = server.aclient()
        return await asyncio.gather(*(one(strict, *case) for case in cases))

    answers = asyncio.run(everyone())
    for (model, prompt, n, _), got in zip(cases, answers):
        want = _greedy(ref, smollm2_tokenizer, _chat_ids(smollm2_tokenizer, prompt), model, n)
        assert got == want, (model, prompt)
    status = client.fine_tuning.jobs.retrieve(job.id)
    assert status.status == "running" and status.model_extra["step"] >= 1
    client.fine_tuning.jobs.cancel(job.id)
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("peftforge_time_to_first_token_seconds_count", "peftforge_inter_token_latency_seconds_bucket",
                 "peftforge_e2e_request_latency_seconds", "peftforge_request_queue_time_seconds",
                 "peftforge_num_requests_running", "peftforge_num_requests_waiting",
                 "peftforge_finetune_tokens_per_second", "peftforge_finetune_optimizer_steps_total",
                 "peftforge_adapter_version", "peftforge_adapter_staleness_steps", "peftforge_cost_model_seconds"):
        assert name in metrics, name
    assert re.search(r"peftforge_num_requests_running 0\.0", metrics)


def test_disconnect_mid_stream_frees_the_slot(served):
    server, _, _ = served
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": BASE, "messages": [{"role": "user", "content": "go"}], "max_tokens": 200,
                            "stream": True, "temperature": 0}) as r:
        next(r.iter_lines())
    for _ in range(100):
        metrics = httpx.get(server.url + "/metrics").text
        if re.search(r"peftforge_num_requests_running 0\.0", metrics):
            break
        time.sleep(0.1)
    assert re.search(r"peftforge_num_requests_running 0\.0", metrics)


def test_shutdown_checkpoints_the_config_job_and_a_restart_resumes_it(tmp_path, smollm2_tokenizer):
    config = _write_config(tmp_path, smollm2_tokenizer, {}, finetune=True)
    server = Server(config)
    client = server.client()
    job_id = "ftjob-config-job"
    for _ in range(600):
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.model_extra["step"] >= 3:
            break
        time.sleep(0.1)
    assert job.status == "running" and job.fine_tuned_model == f"ft:{BASE}:config-job"
    stream = client.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=40, temperature=0, stream=True)
    first = next(iter(stream))
    server.proc.send_signal(signal.SIGTERM)
    rest = list(stream)  # finishes: in-flight requests get shutdown_timeout_s to complete
    assert [c.choices[0].finish_reason for c in [first, *rest] if c.choices][-1] == "length"
    code, log = server.stop()
    assert code == 0, log
    record = json.loads((tmp_path / "jobs" / f"{job_id}.json").read_text())
    assert record["status"] == "queued"
    saved = sorted(int(p.name[5:]) for p in (tmp_path / "config-job" / "checkpoints").glob("step-*"))
    assert saved and saved[-1] >= record["step"] - 1

    again = Server(config)
    try:
        client = again.client()
        for _ in range(300):
            job = client.fine_tuning.jobs.retrieve(job_id)
            if job.status == "running" and job.model_extra["step"] > saved[-1]:
                break
            time.sleep(0.1)
        assert job.status == "running" and job.model_extra["step"] > saved[-1]
        events = [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=100).data]
        assert any(f"resuming after step {saved[-1]}" in m for m in events)
        assert client.models.retrieve(job.fine_tuned_model).model_extra["version"] >= 1
    finally:
        code, log = again.stop()
    assert code == 0, log


def test_bad_serving_config_is_one_line_and_exit_2(tmp_path, smollm2_tokenizer):
    cfg = _write_config(tmp_path, smollm2_tokenizer, {"x": str(tmp_path / "missing")})
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "serve", "--config", str(cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: serving.adapters.x")
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "serve", "--config", str(cfg), "serving.prot=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "did you mean serving.port" in proc.stderr
