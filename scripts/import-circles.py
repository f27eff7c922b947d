#!/usr/bin/env python3
"""Import circles between the files of host/src: each file is a node, and each `crate::a::b` or
`super::` path an edge to the file defining the longest matching module (a module reaching into
its own children is one unit with them, not an edge). Prints each strongly connected component of
more than one file: nothing when no circle is left."""
import re, glob, os, sys
root = 'host/src'
mods = {}
for path in glob.glob(root + '/**/*.rs', recursive=True):
    rel = os.path.relpath(path, root)[:-3]
    parts = rel.split('/')
    if parts[-1] in ('mod', 'lib', 'main'):
        parts = parts[:-1]
    mods['::'.join(parts)] = path
def resolve(segments):
    for n in range(len(segments), 0, -1):
        key = '::'.join(segments[:n])
        if key in mods:
            return mods[key]
    return None
edges = {p: set() for p in mods.values()}
for mod, path in mods.items():
    text = open(path).read()
    text = re.sub(r'#\[cfg\(test\)\]\s*mod tests \{.*', '', text, flags=re.S)
    here = mod.split('::') if mod else []
    refs = [m.split('::') for m in re.findall(r'crate::((?:\w+::)*\w+)', text)]
    # `use crate::{a, b::c}` groups
    for group in re.findall(r'crate::\{([^}]*)\}', text):
        refs += [g.strip().split('::') for g in group.split(',') if g.strip()]
    base = here[:-1]
    for sup in re.findall(r'super::((?:\w+::)*\w+)', text):
        refs.append(base + sup.split('::'))
    for group in re.findall(r'super::\{([^}]*)\}', text):
        refs += [base + g.strip().split('::') for g in group.split(',') if g.strip()]
    if re.search(r'super::\{', text):
        refs.append(base)
    for segments in refs:
        target = resolve([s for s in segments if s])
        # A module reaching into its own children is one unit with them, not a dependency.
        target_module = next((m for m, p in mods.items() if p == target), None)
        owns = target_module is not None and (
            mod == '' or target_module.startswith(mod + '::'))
        if target and target != path and not owns:
            edges[path].add(target)
# Tarjan
index = {}; low = {}; stack = []; on = set(); sccs = []; counter = [0]
sys.setrecursionlimit(10000)
def visit(v):
    index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(sorted(comp))
for v in edges:
    if v not in index: visit(v)
for comp in sccs:
    print(len(comp), ' '.join(os.path.relpath(c, root) for c in comp))
