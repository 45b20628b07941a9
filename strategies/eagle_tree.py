"""`eagle-tree`: the EAGLE head drafts a dynamic tree (EAGLE-2) that the target verifies in one forward.

γ is the tree depth; each level expands the --tree-topk most likely candidates (by the product of
the head's probabilities along their path) into --tree-topk children each, and the --tree-nodes
most likely candidates overall are verified under a tree attention mask. Greedy acceptance walks
the tree along the target's argmax, so output equals greedy decoding; sampled runs draw each node's
children without replacement from the head and verify them by tree rejection sampling, so output
follows the target's sampling distribution.
"""

from __future__ import annotations

from egpt_speed.errors import EgptError
from egpt_speed.flex import FLEX
from egpt_speed.tree import TreeShape
from egpt_speed.strategies.eagle import Eagle
from egpt_speed.strategies.registry import register

TREE_ATTENTION = ("sdpa", "eager")  # implementations that take an arbitrary 4-D additive mask


@register
class EagleTree(Eagle):
    name = "eagle-tree"
    accepts_lent_target = True  # compile+eagle-tree: static_decode.StaticTarget.verify_tree
    summary = "EAGLE head drafts a dynamic tree (γ deep, --tree-topk, --tree-nodes), verified in one forward under a tree mask; lossless (greedy or tree rejection sampling)"

    def prepare(self, model) -> None:
        super().prepare(model)
        attention = model.llm.config._attn_implementation
        on_static_target = self.lender is not None and attention == FLEX  # the engine builds flex's block mask
        if attention not in TREE_ATTENTION and not on_static_target:
            raise EgptError(f"eagle-tree needs sdpa or eager attention for its tree mask, not {attention!r} "
                            "(flex only with compile+eagle-tree); drop the attention strategy or use eagle.")

    def tree_shape(self) -> TreeShape:
        topk, nodes = self.ctx.options.get("tree_topk"), self.ctx.options.get("tree_nodes")
        shape = TreeShape(topk=TreeShape.topk if topk is None else int(topk),
                          max_nodes=TreeShape.max_nodes if nodes is None else int(nodes))
        if shape.topk < 1 or shape.max_nodes < 1:
            raise EgptError("--tree-topk and --tree-nodes must be at least 1.")
        return shape

    def settings(self) -> dict:
        shape = self.tree_shape()
        return {**super().settings(), "tree_depth": self.ctx.gamma, "tree_topk": shape.topk, "tree_nodes": shape.max_nodes}
