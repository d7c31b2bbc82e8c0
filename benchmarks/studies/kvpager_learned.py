"""Study (issue 4, trace goal): does an online-trained return predictor help the relevance policy?

Not part of the benchmark contract: a reproducible record of one attempt at the trace goal
(NeuraOS >= 50% of the LRU-to-Belady gap at 10% capacity on the Mooncake conversation trace).

Every first-seen block gets request-level features at arrival: how many leading blocks of its
request were seen before (the conversation's known prefix), the request's length in blocks and
tokens, the block's depth and relative depth and distance from the end, partial tail, the gap
since the known prefix was last used and how often, how many new blocks the request brings.
A gradient-boosted classifier (scikit-learn) is refitted every REFIT seconds of trace time on
the blocks first seen at least H seconds earlier, labelled by whether they came back within H
(so only the past is used: strictly online, no look-ahead, nothing tuned on the part it is
scored on), and its predicted probability, cut at training quantiles into NB buckets, splits
the reuse model's page classes for first-seen blocks (so each bucket learns its own survival
curve over age). Hit rates are reported for the whole trace and for each half; `off` runs the
same code with no classifier (the plain relevance policy) for the same split.

    python benchmarks/studies/kvpager_learned.py H NB REFIT [off]
Results (2026-11-26, 10% fast tier, whole trace / second half): plain relevance policy
0.2983 / 0.3122; H=900 s, 4 buckets: 0.2933 overall; H=1800 s, 2 buckets: 0.2955 / 0.3064.
The classifier reached only AUC ~0.60 on held-out blocks (GBM, trained on the first half,
tested on the second, "ever returns" label), and splitting classes by it cost more in noisier
survival curves than it gained: worse, not better. LRU 0.2789, Belady 0.3664 on the whole trace.
Part of the loss is that its depth features score a request's blocks differently, and one block
judged low breaks the chain behind it (kvpager_ceiling.py); but even with errors kept
consistent along a request, a predictor of AUC 0.6-0.7 gives 0.2974-0.2996 there: no gain.
"""
import sys, time, math, bisect
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[2]))
from pathlib import Path
import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
import hypervisor.kvpager.policy as P
from hypervisor.kvpager.simulate import load_trace, distinct_blocks, Placement, Access, BLOCK_TOKENS
from hypervisor.kvpager.policy import ReuseModel, RelevancePolicy, PageClass

H=float(sys.argv[1]) if len(sys.argv)>1 else 900.0
NB=int(sys.argv[2]) if len(sys.argv)>2 else 4
REFIT=float(sys.argv[3]) if len(sys.argv)>3 else 300.0
from benchmarks.contract import DATASETS
reqs=load_trace(DATASETS / 'mooncake-traces' / 'conversation_trace.jsonl')
fast=int(distinct_blocks(reqs)*0.10); caps=(fast,2*fast,4*fast)
bucket={}  # block -> learned bucket (first-seen blocks only)
orig=P.classify
def classify(access, uses):
    c=orig(access,uses)
    b=bucket.get(CUR.get(id(access)),0) if uses==1 else 0
    return PageClass(c.reuse, c.size*10+b, c.partial)
CUR={}
P.classify=classify
model=ReuseModel(); pols=[RelevancePolicy(model) for _ in caps]; pl=Placement(caps,pols,[model])
seen={}   # block -> (last t, uses)
ex_t=[]; ex_x=[]; ex_b=[]; returned={}
gbm=None; edges=None; next_fit=H+1
blocks=hits=0; t0=time.time(); fits=0; hb=[0,0]; hh=[0,0]; mid=reqs[len(reqs)//2].timestamp_ms/1000
OFF=len(sys.argv)>4
for i,req in enumerate(reqs):
    now=req.timestamp_ms/1000; ids=req.hash_ids; n=len(ids)
    if now>=next_fit and not OFF:
        m=np.array(ex_t)<=now-H
        if m.sum()>1000:
            X=np.array(ex_x)[m]; y=np.array([returned.get(b,math.inf)-t<=H for b,t,mm in zip(ex_b,ex_t,m) if mm])
            if 0<y.mean()<1:
                gbm=HistGradientBoostingClassifier(max_iter=100,learning_rate=0.1).fit(X,y); fits+=1
                p=gbm.predict_proba(X)[:,1]; edges=np.quantile(p,[k/NB for k in range(1,NB)])
        next_fit=now+REFIT
    f=0
    for h in ids:
        if pl.level(h)!=0: break
        f+=1
    blocks+=n; hits+=f; hb[now>=mid]+=n; hh[now>=mid]+=f
    sp=0
    for h in ids:
        if h in seen: sp+=1
        else: break
    parent=ids[sp-1] if sp else None
    gap=now-seen[parent][0] if parent is not None else -1
    puses=seen[parent][1] if parent is not None else 0
    newb=sum(1 for h in ids if h not in seen)
    feats={}
    for d,h in enumerate(ids):
        if h not in seen:
            x=[sp,n,d,d/n,int(d==n-1 and req.input_length%512!=0),req.input_length,gap,puses,newb,n-1-d]
            feats[h]=x; ex_t.append(now); ex_x.append(x); ex_b.append(h)
        elif h not in returned and seen[h][1]==1:
            returned[h]=now
    if gbm is not None and feats:
        hs=list(feats); p=gbm.predict_proba(np.array([feats[h] for h in hs]))[:,1]
        for h,pp in zip(hs,p): bucket[h]=1+int(np.searchsorted(edges,pp))
    pt=req.input_length%BLOCK_TOKENS!=0
    for d in range(n-1,-1,-1):
        a=Access(now,d,n,pt and d==n-1,None,None); CUR[id(a)]=ids[d]
        pl.access(ids[d],a); CUR.pop(id(a),None)
    for h in ids:
        t,u=seen.get(h,(now,0)); seen[h]=(now,u+1)
print(f'H={H} NB={NB} refit={REFIT} off={OFF} hit {hits/blocks:.4f} first half {hh[0]/hb[0]:.4f} second half {hh[1]/hb[1]:.4f} fits {fits} {time.time()-t0:.0f}s')
