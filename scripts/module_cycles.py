#!/usr/bin/env python3
"""Module dependency cycles inside each crate: edges are `crate::a::b` and `super::x` paths in a
module's code (comments removed) that name another module; parent/child pairs are left out (a
child reads its parent's items by design), so what it reports are cycles between siblings and
cousins. Usage: python3 scripts/module_cycles.py crates/candle-xent crates/candle-resnet ...
Exits 1 when a cycle is found."""
import os, re, sys, itertools
def modules(src):
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith('.rs'): continue
            p = os.path.join(root, f)
            rel = os.path.relpath(p, src)[:-3].split(os.sep)
            if rel[-1] in ('mod', 'lib', 'main'): rel = rel[:-1]
            mods[tuple(rel)] = open(p).read()
    return mods
def resolve(mods, here, path):
    # path: list of segments after crate:: or relative
    best = None
    for i in range(len(path), 0, -1):
        if tuple(path[:i]) in mods: return tuple(path[:i])
    return None
crate_re = re.compile(r'crate::((?:[a-z_][a-z0-9_]*::)*[a-z_][a-z0-9_]*)')
super_re = re.compile(r'\b((?:super::)+)((?:[a-z_][a-z0-9_]*::)*[a-z_][a-z0-9_]*)')
total_cycles = 0
for crate in sys.argv[1:]:
    mods = modules(os.path.join(crate, 'src'))
    edges = {m: set() for m in mods}
    for m, text in mods.items():
        # strip comments
        text = re.sub(r'//[^\n]*', '', text)
        is_dirmod = True  # mod.rs/lib.rs vs leaf: super is relative to parent of file module
        for mt in crate_re.finditer(text):
            t = resolve(mods, m, mt.group(1).split('::'))
            if t is not None and t != m: edges[m].add(t)
        for mt in super_re.finditer(text):
            ups = mt.group(1).count('super::')
            base = list(m[:len(m)-ups])
            t = resolve(mods, m, base + mt.group(2).split('::'))
            if t is not None and t != m: edges[m].add(t)
    def related(a, b): return a[:len(b)] == b or b[:len(a)] == a
    # collapse: only edges between unrelated modules
    g = {m: {t for t in ts if not related(m, t)} for m, ts in edges.items()}
    # find cycles via DFS on SCCs
    index = {}; low = {}; stack = []; on = set(); sccs = []; idx = [0]
    sys.setrecursionlimit(10000)
    def sc(v):
        index[v] = low[v] = idx[0]; idx[0] += 1; stack.append(v); on.add(v)
        for w in g[v]:
            if w not in index: sc(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: sccs.append(comp)
    for v in g:
        if v not in index: sc(v)
    print(f"{crate}: {len(mods)} modules, {sum(len(v) for v in g.values())} edges between unrelated modules, cycles: {[['::'.join(x) for x in c] for c in sccs]}")
    total_cycles += len(sccs)
sys.exit(1 if total_cycles else 0)
