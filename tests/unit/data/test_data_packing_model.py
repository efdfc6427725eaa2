"""Packing is invisible to the model: a packed row gives the losses, logits and gradients of its
documents run one by one (tiny GPT-OSS, fp32, eager attention, tolerance 1e-5 abs + rel)."""

import torch

from engine.data.config import DataConfig
from engine.data.dataset import DocumentEncoder, JsonlFile
from engine.data.packing import collate, document_labels
from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM

TOL = dict(rtol=1e-5, atol=1e-5)


def test_packed_row_equals_documents_one_by_one(tokenizer):
    cfg = DataConfig()
    file = JsonlFile(cfg.resolved_train_path())
    # Three multi-turn records of different lengths: longer than the tiny model's sliding window
    # (16), so windows and document boundaries interact.
    docs = [d for d in DocumentEncoder(cfg, tokenizer).encode(file.path, file.read([3, 4, 7])) if d is not None]
    assert len(docs) == 3 and all(len(d) > 16 for d in docs)
    max_seq_len = sum(len(d) for d in docs) + 5  # some padding at the end too
    batch = collate([docs], max_seq_len, tokenizer.pad_id)

    torch.manual_seed(0)
    model = GptOssForCausalLM(GptOssConfig.tiny(), attn_backend="eager")
    model.init_weights(0)
    model.float()

    packed_loss = model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                        doc_ids=batch["doc_ids"], loss_normalizer=1.0)
    packed_loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    alone_loss = torch.zeros(())
    for doc in docs:
        ids = torch.from_numpy(doc.input_ids)[None]  # [1, L]
        labels = torch.from_numpy(document_labels(doc))[None]  # [1, L]
        loss = model(ids, labels=labels, loss_normalizer=1.0)
        loss.backward()
        alone_loss += loss.detach()
    torch.testing.assert_close(packed_loss.detach(), alone_loss, **TOL)
    for name, param in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], param.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")

    with torch.no_grad():
        packed_logits = model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])
        start = 0
        for doc in docs:
            alone = model(torch.from_numpy(doc.input_ids)[None])  # [1, L, V]
            torch.testing.assert_close(packed_logits[:, start : start + len(doc)], alone, **TOL)
            start += len(doc)


def test_a_best_fit_epoch_has_the_loss_of_the_same_documents_unpacked(tokenizer, write_jsonl):
    # 24 sample chats; best fit in windows of 7 documents puts them in 12 rows instead of 24: the
    # epoch's summed token loss and target count are those of one document per row.
    from engine.data.loader import build_train_loader
    from engine.data.sampler import Cursor, GlobalOrder

    lines = DataConfig().resolved_train_path()
    with open(lines, encoding="utf-8") as f:
        path = write_jsonl([line.rstrip("\n") for line in f.readlines()[:24]])
    store = build_train_loader(DataConfig(train_path=str(path), max_seq_len=256), tokenizer,
                               store_dir=path.parent / "store", seed=0).store
    torch.manual_seed(0)
    model = GptOssForCausalLM(GptOssConfig.tiny(), attn_backend="eager")
    model.init_weights(0)
    model.float()

    def epoch(pack):
        order = GlobalOrder(store.lengths, max_seq_len=256, pack=pack, shuffle=True, seed=3, window=7)
        rows = [[store.document(int(i)) for i in order.docs(Cursor(0, r))] for r in range(order.rows_in(0))]
        batch = collate(rows, 256, tokenizer.pad_id)
        with torch.no_grad():
            loss = model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                         doc_ids=batch["doc_ids"], loss_normalizer=1.0)
        return loss, batch["num_target_tokens"], len(rows)

    packed, unpacked = epoch("best_fit"), epoch(False)
    assert unpacked[2] == 24 and packed[2] < 16
    assert packed[1] == unpacked[1] == store.manifest["token_stats"]["target_tokens"]
    torch.testing.assert_close(packed[0], unpacked[0], **TOL)
