import sys; sys.path.insert(0,'/tmp/probe16/hfgen')
from common import *
attn = sys.argv[1]
ref, pg = pair("llama")
enable_paging(pg, budget(vram=3, host=3), attn_implementation=attn, prefill_chunk_size=16)
B = torch.randint(3, 128, (3, 20), generator=torch.Generator().manual_seed(2)); M = torch.ones_like(B); M[0, :4] = 0; M[1, :15] = 0; B[M == 0] = 0
o = ref.generate(B, attention_mask=M, max_new_tokens=12)
eos = int(o[0, 22])  # row 0's third new token
print("eos", eos, o[:, 20:].tolist())
for kw in (dict(), dict(do_sample=True, top_k=4), dict(num_beams=2)):
    res = []
    for m in (ref, pg):
        torch.manual_seed(0)
        res.append(m.generate(B, attention_mask=M, max_new_tokens=12, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True, output_logits=True))
    a, b = res
    ok = torch.equal(a.sequences, b.sequences); d = max((p - q).abs().max().item() for p, q in zip(a.logits, b.logits))
    print(kw, a.sequences.shape, "OK" if ok and (d == 0 or attn != "sdpa" and d < 1e-4) else "DIFF", d)
