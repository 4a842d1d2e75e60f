"""The task graph: adjacency, cycles, topological order and ancestry, all O(V+E)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Graph:
    """A directed graph over task names; an edge ``a -> b`` means b depends on a.

    Unknown dependencies and self-loops are not edges: validation reports them, and
    keeping them out lets the rest of the graph be analysed in the same pass.
    """

    nodes: tuple[str, ...]
    deps: Mapping[str, tuple[str, ...]]
    children: Mapping[str, tuple[str, ...]] = field(repr=False)

    @classmethod
    def build(cls, edges: Iterable[tuple[str, Sequence[str]]]) -> Graph:
        """Build from ``(task, depends_on)`` pairs; first occurrence of a name wins."""
        nodes: list[str] = []
        deps: dict[str, tuple[str, ...]] = {}
        for name, depends_on in edges:
            if name in deps:
                continue
            nodes.append(name)
            deps[name] = tuple(dict.fromkeys(depends_on))
        children: dict[str, list[str]] = {n: [] for n in nodes}
        clean: dict[str, tuple[str, ...]] = {}
        for name in nodes:
            kept = tuple(d for d in deps[name] if d in children and d != name)
            clean[name] = kept
            for d in kept:
                children[d].append(name)
        return cls(tuple(nodes), clean, {k: tuple(v) for k, v in children.items()})

    def cycles(self) -> list[list[str]]:
        """Each strongly connected component with more than one node, in a cycle order.

        Tarjan's algorithm, iterative so a 50,000-task chain does not overflow the stack.
        """
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        on_stack: set[str] = set()
        stack: list[str] = []
        found: list[list[str]] = []
        counter = 0
        for root in self.nodes:
            if root in index:
                continue
            work: list[tuple[str, int]] = [(root, 0)]
            while work:
                node, i = work[-1]
                if i == 0:
                    index[node] = low[node] = counter
                    counter += 1
                    stack.append(node)
                    on_stack.add(node)
                succ = self.children[node]
                if i < len(succ):
                    work[-1] = (node, i + 1)
                    nxt = succ[i]
                    if nxt not in index:
                        work.append((nxt, 0))
                    elif nxt in on_stack:
                        low[node] = min(low[node], index[nxt])
                    continue
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component: list[str] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(self._cycle_path(set(component)))
        return found

    def _cycle_path(self, members: set[str]) -> list[str]:
        """One closed walk through a component, starting at its first-declared node."""
        start = next(n for n in self.nodes if n in members)
        path = [start]
        seen = {start}
        node = start
        while True:
            nxt = next(c for c in self.children[node] if c in members)
            if nxt in seen:
                return [*path[path.index(nxt) :], nxt]
            path.append(nxt)
            seen.add(nxt)
            node = nxt

    def topological_order(self) -> list[str]:
        """Kahn's algorithm, stable in declaration order; raises ``ValueError`` on a cycle."""
        indegree = {n: len(self.deps[n]) for n in self.nodes}
        ready = [n for n in self.nodes if indegree[n] == 0]
        order: list[str] = []
        i = 0
        while i < len(ready):
            node = ready[i]
            i += 1
            order.append(node)
            for child in self.children[node]:
                indegree[child] -= 1
                if indegree[child] == 0:
                    ready.append(child)
        if len(order) != len(self.nodes):
            raise ValueError("graph has a cycle")
        return order

    def is_upstream(self, ancestor: str, node: str) -> bool:
        """Whether ``node`` depends on ``ancestor``, directly or not (DFS, O(V+E))."""
        direct = self.deps.get(node, ())
        if ancestor in direct:
            return True  # the common case: a template reads a direct dependency
        seen: set[str] = set()
        todo = list(direct)
        while todo:
            cur = todo.pop()
            if cur == ancestor:
                return True
            if cur not in seen:
                seen.add(cur)
                todo.extend(self.deps[cur])
        return False

    def ready(self, done: set[str], started: set[str]) -> list[str]:
        """Nodes not yet started whose dependencies are all in ``done``."""
        return [
            n
            for n in self.nodes
            if n not in started and n not in done and all(d in done for d in self.deps[n])
        ]
