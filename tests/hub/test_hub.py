from __future__ import annotations

import json
import math
import pickle
import traceback
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard, constants, snapshot_download
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

from hf_capgap import cli
from hf_capgap.hub import (
    PLOT_NAME,
    HubUploadError,
    StudentCardInfo,
    is_pickle_file,
    law_position,
    push_student,
    render_model_card,
    write_model_card,
)
from hf_capgap.law import CapacityGapLaw
from tests.conftest import tiny_llama
from tests.helpers.hub_server import FakeHub

TOKEN = "hf_testtoken_0123456789abcdef"
REPO = "tester/tiny-student"
TINY_PNG = bytes.fromhex(  # a 1x1 RGBA PNG
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d49444154789c6300010000000500010d0a2db40000000049454e44ae426082"
)


def card_info(plot: Path | None = None, **overrides) -> dict:
    info = {
        "model_name": REPO,
        "teacher": "tester/tiny-teacher",
        "teacher_hub_id": "tester/tiny-teacher",
        "license": "apache-2.0",
        "repo_id": REPO,
        "teacher_params": 5_000,
        "student_params": 1_000,
        "law": CapacityGapLaw(
            ratio=2.5,
            ratio_ci=(2.0, 3.0),
            source="fitted",
            slope_affine=7.77,
            intercept=333.0,
            r2=0.97,
            families=["llama"],
        ).to_dict(),
        "pruning": {
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "intermediate_size": 64,
            "kept_fraction": 0.2,
        },
        "training": {
            "loss": "forward_kl",
            "alpha": 0.5,
            "temperature": 2.0,
            "learning_rate": 3e-4,
            "steps": 10,
            "tokens": 5120,
            "batch_size": 4,
            "seq_len": 32,
        },
        "teacher_eval": {"loss": 2.1, "perplexity": 8.17},
        "pruned_eval": {"loss": 4.2, "perplexity": 66.69},
        "distilled_eval": {"loss": 2.6, "perplexity": 13.46},
        "scratch_eval": {"loss": 3.1, "perplexity": 22.2},
        "eval_dataset": "capgap-corpus",
        "datasets": ["capgap-corpus"],
        "law_plot": None if plot is None else str(plot),
    }
    return info | overrides


@pytest.fixture(scope="module")
def exported_student(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export") / "student"
    folder.mkdir()
    vocab = {token: index for index, token in enumerate(["<unk>", "<s>", "</s>", *"abcdefghijklmnop "])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tiny_llama(len(vocab), hidden=32, layers=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    plot = folder.parent / "law.png"
    plot.write_bytes(TINY_PNG)
    write_model_card(folder, card_info(plot))
    return folder


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A local Hub, with offline mode lifted for huggingface_hub's own calls in this test only."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    server = FakeHub(max_requests=100, lifetime_s=60).start()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-login" / "stored_tokens"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    yield server
    server.stop()


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_law_position_and_card_text():
    info = StudentCardInfo.from_dict(card_info())
    position = law_position(info)
    assert position["actual_ratio"] == pytest.approx(5.0)
    assert position["within_ci"] is False
    text = str(render_model_card(info))
    assert "**outside**" in text and "2,500 parameters" in text
    assert "| Pruned student, before distillation | 4.2000 | 66.69 |" in text
    assert "AutoModelForCausalLM.from_pretrained" in text
    inside = StudentCardInfo.from_dict(card_info(teacher_params=2_400))
    assert "**within**" in str(render_model_card(inside))


def affine_law() -> CapacityGapLaw:
    """A law fitted through-optima t* = 2 s + 50M (slightly noisy losses), predicting with the affine line."""
    rng = np.random.default_rng(0)
    records = [
        {
            "student_params": student,
            "teacher_params": float(teacher),
            "eval_loss": 2 + 0.05 * math.log(teacher / (2 * student + 50e6)) ** 2 + float(rng.normal(0, 0.001)),
        }
        for student in (10e6, 20e6, 40e6, 80e6, 160e6, 320e6)
        for teacher in np.geomspace(12e6, 4e9, 25)
        if teacher > 1.1 * student
    ]
    return CapacityGapLaw.fit(records, through_origin=False, n_bootstrap=200)


def test_card_places_the_teacher_with_the_law_that_chose_it():
    law = affine_law()
    suggestion = law.suggest(10e6, [30e6, 70e6, 300e6])
    assert suggestion.teacher_params == 70e6 and suggestion.choice.in_interval
    info = StudentCardInfo.from_dict(
        card_info(teacher_params=70_000_000, student_params=10_000_000, law=law.to_dict())
    )
    position = law_position(info)
    assert position["law_teacher_params"] == pytest.approx(suggestion.optimum.params)
    assert position["teacher_interval"] == pytest.approx([suggestion.optimum.lo, suggestion.optimum.hi])
    assert position["within_ci"] is True
    text = str(render_model_card(info))
    assert "**within**" in text and law.formula() in text
    assert f"{law.slope_affine:.3g} / {law.intercept:,.0f} parameters" in text
    assert "Law ratio" not in text and f"{law.r2_affine:.3f}" in text

    origin = str(render_model_card(card_info()))
    assert "t* = 2.5 x s" in origin and "intercept" not in origin and "7.77" not in origin


def test_card_of_a_local_teacher_has_no_base_model_link_license_or_machine_path():
    info = card_info(teacher="my-teacher", teacher_hub_id=None, license=None, repo_id="me/student", scratch_eval=None)
    with pytest.warns(UserWarning, match="no license"):
        card = render_model_card(info)
    text = str(card)
    assert card.data.base_model is None and card.data.license is None
    assert "huggingface.co/my-teacher" not in text and "No license is stated yet" in text
    assert 'from_pretrained("me/student")' in text
    assert "| Same-size student trained from scratch | not run | not run |" in text
    with pytest.raises(ValueError, match="teacher_hub_id='~/models/teacher'"):
        render_model_card(card_info(teacher_hub_id="~/models/teacher"))


def test_card_names_the_teacher_hub_id_and_the_license():
    card = render_model_card(card_info(teacher_hub_id="meta-llama/Llama-2-7b-hf", license="llama2"))
    assert card.data.base_model == "meta-llama/Llama-2-7b-hf" and card.data.license == "llama2"
    assert "(https://huggingface.co/meta-llama/Llama-2-7b-hf)" in str(card)


def test_card_info_errors_name_the_field():
    with pytest.raises(ValueError, match="ratio_ci"):
        render_model_card(card_info(law={**card_info()["law"], "ratio_ci": [3.0, 2.0]}))
    with pytest.raises(ValueError, match="law: .*lacks the field 'optima'"):
        render_model_card(card_info(law={k: v for k, v in card_info()["law"].items() if k != "optima"}))
    with pytest.raises(ValueError, match="missing field"):
        render_model_card({k: v for k, v in card_info().items() if k != "teacher"})
    with pytest.raises(ValueError, match="kept_fraction"):
        render_model_card(card_info(pruning={**card_info()["pruning"], "kept_fraction": 1.5}))


def test_write_model_card_copies_plot_and_metadata(exported_student):
    assert (exported_student / PLOT_NAME).read_bytes() == TINY_PNG
    card = ModelCard.load(exported_student / "README.md")
    assert f"]({PLOT_NAME})" in card.text


def test_push_uploads_folder_byte_for_byte_and_reloads(hub, exported_student, tmp_path):
    before = folder_bytes(exported_student)
    url = push_student(exported_student, REPO, token=TOKEN, endpoint=hub.url)
    assert url.startswith(f"{hub.url}/{REPO}/commit/")
    assert hub.files(REPO) == before
    assert folder_bytes(exported_student) == before
    assert {r.authorization for r in hub.requests if r.path.startswith(("/api/repos", "/api/models"))} == {
        f"Bearer {TOKEN}"
    }
    assert all(TOKEN.encode() not in data for data in before.values())

    card = ModelCard.load(REPO)
    assert card.data.base_model == "tester/tiny-teacher"
    assert set(card.data.tags) >= {"distillation", "capacity-gap-law", "hf_capgap"}
    metrics = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert metrics == {"loss": 2.6, "perplexity": 13.46}

    snapshot = snapshot_download(REPO, endpoint=hub.url, local_dir=tmp_path / "snapshot")
    reloaded = AutoModelForCausalLM.from_pretrained(snapshot)
    original = AutoModelForCausalLM.from_pretrained(exported_student)
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


def test_push_to_a_new_branch(hub, exported_student):
    push_student(exported_student, REPO, token=TOKEN, endpoint=hub.url, revision="v1")
    assert hub.files(REPO, "v1") == folder_bytes(exported_student)
    assert hub.files(REPO, "main") == {}


def test_failed_upload_keeps_folder_names_retry_and_hides_token(hub, exported_student, monkeypatch, caplog):
    monkeypatch.setattr(
        huggingface_hub.utils._http, "time", type("NoSleep", (), {"sleep": staticmethod(lambda s: None)})
    )
    hub.fail("commit", 500)
    before = folder_bytes(exported_student)
    with pytest.raises(HubUploadError) as caught:
        push_student(exported_student, REPO, token=TOKEN, endpoint=hub.url, private=True)
    message = str(caught.value)
    assert f"Retry with: hf-capgap push {exported_student} {REPO} --private --endpoint {hub.url}" in message
    assert TOKEN not in "".join(traceback.format_exception(caught.value))
    assert any("commit" in record.getMessage() for record in caplog.records)
    assert all(TOKEN not in record.getMessage() for record in caplog.records)
    assert folder_bytes(exported_student) == before
    assert hub.files(REPO) == {}


def test_offline_mode_fails_before_any_request(hub, exported_student, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        push_student(exported_student, REPO, token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


@pytest.mark.parametrize("removed", ["config.json", "model.safetensors", "tokenizer.json", "README.md"])
def test_incomplete_folder_fails_before_any_request(hub, exported_student, tmp_path, removed):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name, data in folder_bytes(exported_student).items():
        if name != removed:
            (partial / name).write_bytes(data)
    with pytest.raises(ValueError, match=removed.split(".")[0]):
        push_student(partial, REPO, token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_push_of_a_trainer_folder_sends_no_pickle_and_never_the_token(hub, exported_student, tmp_path, caplog):
    folder = tmp_path / "trainer-output"
    model = AutoModelForCausalLM.from_pretrained(exported_student)
    args = TrainingArguments(output_dir=str(folder), hub_token=TOKEN, report_to="none", use_cpu=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(exported_student)
    Trainer(model=model, args=args, processing_class=tokenizer).save_model()
    (folder / "checkpoint-1").mkdir()
    torch.save({"step": 1}, folder / "checkpoint-1" / "optimizer.pt")
    write_model_card(folder, card_info())
    assert TOKEN.encode() in (folder / "training_args.bin").read_bytes()

    push_student(folder, REPO, token=TOKEN, endpoint=hub.url)
    uploaded = hub.files(REPO)
    assert {"config.json", "model.safetensors", "README.md"} <= set(uploaded)
    assert not [name for name in uploaded if name.endswith((".bin", ".pt"))]
    assert all(TOKEN.encode() not in data for data in uploaded.values())
    assert any("training_args.bin" in r.getMessage() and "optimizer.pt" in r.getMessage() for r in caplog.records)


def test_push_refuses_a_file_holding_the_token_without_echoing_it(hub, exported_student, tmp_path, monkeypatch):
    folder = tmp_path / "leaky"
    folder.mkdir()
    for name, data in folder_bytes(exported_student).items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text(f"pushed with HF_TOKEN={TOKEN}\n")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(ValueError, match="notes.txt") as caught:
        push_student(folder, REPO, endpoint=hub.url)
    assert TOKEN not in str(caught.value)
    assert hub.requests == []


def test_cli_card_and_push(hub, exported_student, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "cli-student"
    folder.mkdir()
    for name, data in folder_bytes(exported_student).items():
        if name != "README.md":
            (folder / name).write_bytes(data)
    info = tmp_path / "info.json"
    info.write_text(json.dumps(card_info(model_name="tester/cli-student")))
    assert cli.main(["card", str(folder), "--info", str(info)]) == 0
    assert ModelCard.load(folder / "README.md").data.base_model == "tester/tiny-teacher"

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli.main(["push", str(folder), "tester/cli-student", "--endpoint", hub.url]) == 0
    assert hub.files("tester/cli-student") == folder_bytes(folder)
    assert hub.requests[0].authorization == f"Bearer {TOKEN}"
    assert TOKEN not in capsys.readouterr().out


def copy_student(exported_student: Path, folder: Path) -> Path:
    folder.mkdir()
    for name, data in folder_bytes(exported_student).items():
        (folder / name).write_bytes(data)
    return folder


def test_push_skips_pickles_under_any_name_by_their_content(hub, exported_student, tmp_path, caplog):
    folder = copy_student(exported_student, tmp_path / "renamed-pickles")
    other = "hf_OTHERtoken_abcdef0123456789"
    torch.save({"hub_token": other}, folder / "training_args.BIN")
    torch.save({"x": 1}, folder / "optimizer.PT")
    torch.save({"x": 1}, folder / "checkpoint.pth.tar")
    torch.save({"x": 1}, folder / "rng_state")
    np.save(folder / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(folder / "plain.npy", np.arange(4.0))
    np.savez(folder / "objects.npz", a=np.array([{"a": 1}], dtype=object))
    (folder / "pytorch_model_fsdp_0").mkdir()
    (folder / "pytorch_model_fsdp_0" / ".metadata").write_bytes(pickle.dumps({"md": 1}, protocol=4))
    pickles = {
        "training_args.BIN",
        "optimizer.PT",
        "checkpoint.pth.tar",
        "rng_state",
        "obj.npy",
        "objects.npz",
        "pytorch_model_fsdp_0/.metadata",
    }
    assert all(is_pickle_file(folder / name) for name in pickles - {"training_args.BIN", "optimizer.PT"})
    assert not any(is_pickle_file(folder / name) for name in ("plain.npy", "model.safetensors", "config.json"))

    push_student(folder, REPO, token=TOKEN, endpoint=hub.url)
    uploaded = hub.files(REPO)
    assert not pickles & set(uploaded)
    assert {"plain.npy", "model.safetensors", "README.md"} <= set(uploaded)
    assert all(other.encode() not in data for data in uploaded.values())
    warned = " ".join(record.getMessage() for record in caplog.records)
    assert all(name in warned for name in pickles)


def test_push_refuses_a_file_holding_any_token_of_this_machine(hub, exported_student, tmp_path, monkeypatch):
    env_token, saved_token = "hf_ENVtoken_9876543210fedcba", "hf_SAVEDtoken_55554444333322"
    (tmp_path / "no-login").mkdir()
    Path(constants.HF_STORED_TOKENS_PATH).write_text(f"[work]\nhf_token = {saved_token}\n")
    monkeypatch.setenv("HF_TOKEN", env_token + "\n")
    for source, leaked in (("env", env_token), ("saved", saved_token)):
        folder = copy_student(exported_student, tmp_path / source)
        (folder / "train_env.txt").write_text(f"token={leaked}\n")
        with pytest.raises(ValueError, match="train_env.txt") as caught:
            push_student(folder, REPO, token=TOKEN, endpoint=hub.url)
        assert leaked not in str(caught.value) and TOKEN not in str(caught.value)
    assert hub.requests == []


def test_cli_push_with_a_newline_after_hf_token_sends_it_stripped_and_never_prints_it(
    hub, exported_student, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(
        huggingface_hub.utils._http, "time", type("NoSleep", (), {"sleep": staticmethod(lambda s: None)})
    )
    folder = copy_student(exported_student, tmp_path / "cli-newline")
    monkeypatch.setenv("HF_TOKEN", TOKEN + "\n")
    assert cli.main(["push", str(folder), REPO, "--endpoint", hub.url]) == 0
    assert {request.authorization for request in hub.requests} == {f"Bearer {TOKEN}"}
    hub.fail("commit", 500)
    assert cli.main(["push", str(folder), REPO, "--endpoint", hub.url, "--token", f" {TOKEN}\n"]) == 1
    captured = capsys.readouterr()
    assert "Retry with" in captured.err
    assert TOKEN not in captured.out + captured.err


def save_safetensors_with_header_like_a_pickle(path: Path) -> None:
    """Save a safetensors file whose header length's first bytes read 80 0N, as a pickle's do."""
    import struct

    from safetensors.torch import save_file

    for pad in range(1500):
        save_file({"w": torch.zeros(2, 2)}, path, metadata={"format": "pt", "pad": "x" * pad})
        length = struct.unpack("<Q", path.read_bytes()[:8])[0]
        if length & 0xFF == 0x80 and 2 <= (length >> 8) & 0xFF <= 5:
            return
    raise AssertionError("no padding gave a pickle-like header length")


def test_safetensors_whose_header_length_reads_like_a_pickle_is_uploaded(hub, exported_student, tmp_path):
    folder = copy_student(exported_student, tmp_path / "pickle-like-header")
    save_safetensors_with_header_like_a_pickle(folder / "model.safetensors")
    assert not is_pickle_file(folder / "model.safetensors")
    push_student(folder, REPO, token=TOKEN, endpoint=hub.url)
    assert hub.files(REPO)["model.safetensors"] == (folder / "model.safetensors").read_bytes()


def test_push_refuses_when_a_required_file_would_be_skipped_as_a_pickle(hub, exported_student, tmp_path):
    folder = copy_student(exported_student, tmp_path / "pickled-weights")
    torch.save({"w": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"leave out model\.safetensors.*skipped as pickle\(s\): model\.safetensors"):
        push_student(folder, REPO, token=TOKEN, endpoint=hub.url)
    assert REPO not in hub.repos


def test_compressed_pickles_are_not_uploaded(hub, exported_student, tmp_path):
    import gzip
    import lzma

    folder = copy_student(exported_student, tmp_path / "compressed-pickles")
    (folder / "state.pkl.gz").write_bytes(gzip.compress(pickle.dumps({"x": 1})))
    (folder / "state.PICKLE.xz").write_bytes(lzma.compress(pickle.dumps({"x": 1})))
    (folder / "model.joblib.bz2").write_bytes(b"BZh9")
    push_student(folder, REPO, token=TOKEN, endpoint=hub.url)
    assert not {"state.pkl.gz", "state.PICKLE.xz", "model.joblib.bz2"} & set(hub.files(REPO))


def test_an_explicit_token_push_ignores_an_oidc_setting_and_sends_no_exchange(hub, exported_student, monkeypatch):
    monkeypatch.setenv("HF_OIDC_RESOURCE", REPO)
    monkeypatch.setenv("HF_OIDC_ID_TOKEN", "eyJ.fake.jwt")
    push_student(exported_student, REPO, token=TOKEN, endpoint=hub.url)
    assert "README.md" in hub.files(REPO)
    assert not any("oauth" in request.path for request in hub.requests)


def test_a_failed_oidc_exchange_is_a_hub_upload_error_without_the_token(hub, exported_student, monkeypatch):
    monkeypatch.setenv("HF_OIDC_RESOURCE", REPO)
    monkeypatch.setenv("HF_OIDC_ID_TOKEN", "eyJ.fake.jwt")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(HubUploadError, match="could not read the Hub tokens") as caught:
        push_student(exported_student, REPO, endpoint=hub.url)
    assert TOKEN not in str(caught.value)
    assert REPO not in hub.repos


CHAIN = [
    {"role": "teacher", "name": "tiny-teacher", "params": 5_000, "loss": 3.1},
    {"role": "assistant", "name": "assistant-1", "params": 2_000, "loss": 3.4, "tokens": 4096},
    {"role": "student", "name": "tiny-student", "params": 1_000, "loss": 3.6, "tokens": 8192},
]


def test_card_names_the_assistant_chain_and_keeps_the_teacher_as_base_model():
    card = render_model_card(card_info(chain=CHAIN))
    assert "Distilled through assistants: 5K -> 2K -> 1K" in card.text
    assert "| assistant-1 | assistant | 2,000 | 3.4000 | 4,096 |" in card.text
    assert "| tiny-teacher | teacher | 5,000 | 3.1000 | pretrained |" in card.text
    assert "pruned from the model above it" in card.text and "of assistant-1, the last assistant" in card.text
    assert card.data.base_model == "tester/tiny-teacher"
    plain = render_model_card(card_info())
    assert "Teacher assistants" not in plain.text and "of the teacher's parameters" in plain.text


@pytest.mark.parametrize("chain", [CHAIN[::2], CHAIN[::-1], [{**CHAIN[0], "size": 1}, *CHAIN[1:]]])
def test_card_refuses_a_chain_that_is_not_teacher_assistants_student(chain):
    with pytest.raises(ValueError, match="chain"):
        render_model_card(card_info(chain=chain))


def test_card_claims_the_law_only_for_a_chain_whose_every_step_is_within_it():
    """A user's list past the law's bound gets its ratios and the law's optimum, never 'within the law'."""
    paper = CapacityGapLaw.paper().to_dict()  # k = 2.5, no interval
    listed = [{**CHAIN[0], "params": 86_208}, {**CHAIN[1], "params": 60_096}, {**CHAIN[2], "params": 22_112}]
    text = render_model_card(card_info(chain=listed, law=paper, teacher_params=86_208, student_params=22_112)).text
    assert "assistants chosen by the user; step ratios 1.43x, 2.72x against the law's optimum of 2.5x" in text
    assert "step 2 past the largest ratio the law allows (2.5x)" in text and "within the law" not in text
    planned = render_model_card(card_info(chain=CHAIN, chain_planned_by_law=True)).text  # 2.5x, 2x; k in [2, 3]
    assert "assistants planned by the law; step ratios 2.50x, 2.00x against the law's optimum of 2.5x" in planned
    assert "every step within the law of capacity gap" in planned
