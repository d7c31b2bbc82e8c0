"""Study (issue 4, trace goal): how good must a return predictor be to close half the gap?

A diagnostic that reads the future on purpose (it is never a policy): each block's label is
whether it is used again anywhere in the trace, and a synthetic predictor of a chosen AUC
scores it as label*d + noise (d = sqrt(2) * probit(AUC)); its score, cut into NB quantile
buckets, splits the relevance policy's page classes for first-seen blocks, exactly as the
online-trained predictor of studies/kvpager_learned.py does. `req` draws one noise value per
request for all the blocks it brings first (errors consistent along a prefix chain, as any
request-level predictor's are); without it each block gets its own noise.

    python benchmarks/studies/kvpager_ceiling.py AUC NB HORIZON_S [req]

Results (2026-11-26, 10% fast tier, Mooncake conversation trace; LRU 0.2789, Belady 0.3664,
plain relevance policy 0.2983 = 22% of the gap), hit rate / share of the gap closed:
request-consistent errors, 2 buckets: AUC 0.6 0.2974 (21%), 0.7 0.2996 (24%), 0.9 0.3226 (50%);
4 buckets: AUC 0.8 0.3123 (38%); a perfect bit (AUC 1.0) 0.3623 (95%).
Per-block errors, 4 buckets: AUC 0.6 0.2753, 0.7 0.2560, 0.8 0.2551, 0.9 0.2644 -- worse than
no predictor: one misjudged block breaks its whole chain (a prefix cache serves nothing past
it), so a block's value must follow its request, not its own score.
So the goal needs a predictor of whether a first-seen block returns at AUC ~0.9; the best online
one found here reaches ~0.60 (the best single feature 0.56-0.67).
"""
import sys, time, math
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[2]))
import numpy as np
from statistics import NormalDist
import hypervisor.kvpager.policy as P
from benchmarks.contract import DATASETS
from hypervisor.kvpager.simulate import load_trace, distinct_blocks, Placement, Access, BLOCK_TOKENS
from hypervisor.kvpager.policy import ReuseModel, RelevancePolicy, PageClass
if len(sys.argv) < 4:
    sys.exit(f"usage: {sys.argv[0]} AUC NB HORIZON_S [req]")
auc=float(sys.argv[1]); NB=int(sys.argv[2]); HZ=float(sys.argv[3])
d=math.sqrt(2)*NormalDist().inv_cdf(auc) if auc<1 else 50.0
reqs=load_trace(DATASETS/'mooncake-traces'/'conversation_trace.jsonl')
fast=int(distinct_blocks(reqs)*0.10); caps=(fast,2*fast,4*fast)
cnt={}
for r in reqs:
    for h in r.hash_ids: cnt[h]=cnt.get(h,0)+1
rng=np.random.default_rng(0)
hs=list(cnt); y=np.array([cnt[h]>1 for h in hs]); s=y*d+rng.standard_normal(len(hs))
if len(sys.argv)>4:  # one noise draw per request for the blocks it brings first (scores consistent along a chain)
    seen=set(); noise={}
    for r in reqs:
        z=rng.standard_normal()
        for h in r.hash_ids:
            if h not in seen: seen.add(h); noise[h]=z
    s=y*d+np.array([noise[h] for h in hs])
edges=np.quantile(s,[k/NB for k in range(1,NB)]); bucket=dict(zip(hs,1+np.searchsorted(edges,s)))
orig=P.classify; CUR={}
def classify(access, uses):
    c=orig(access,uses); b=bucket.get(CUR.get(id(access)),0) if uses==1 else 0
    return PageClass(c.reuse, c.size*10+b, c.partial)
P.classify=classify
model=ReuseModel(); pl=Placement(caps,[RelevancePolicy(model, horizon_s=HZ) for _ in caps],[model])
blocks=hits=0
for req in reqs:
    now=req.timestamp_ms/1000; ids=req.hash_ids; n=len(ids); f=0
    for h in ids:
        if pl.level(h)!=0: break
        f+=1
    blocks+=n; hits+=f; pt=req.input_length%BLOCK_TOKENS!=0
    for dd in range(n-1,-1,-1):
        a=Access(now,dd,n,pt and dd==n-1,None,None); CUR[id(a)]=ids[dd]; pl.access(ids[dd],a); CUR.pop(id(a),None)
print(f'AUC {auc} NB {NB} HZ {HZ}: hit {hits/blocks:.4f}  gap closed {(hits/blocks-0.2789)/(0.3664-0.2789):.3f}')
