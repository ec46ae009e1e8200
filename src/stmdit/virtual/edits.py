"""The edit grammar of virtual tissue experiments: what to change in a spot's expression.

An edit is one or more terms separated by commas, applied left to right to the spot's expression
in log1p CP10k units (x = log1p(10,000 c / total counts)):

    GENE*f        multiply the gene's expression (counts) by f >= 0: CD8A*4, PTPRC*0.5
    GENE+d        add d to x (log1p units): MKI67+2;  GENE-d subtracts (x stays >= 0)
    GENE=v        set x to v >= 0: PTPRC=0 silences the gene
    SET*f ...     the same on every gene of a named gene set (virtual.gene_sets in the config)
    toward:LABEL@a  move the whole profile toward the mean log1p profile of the TRAIN spots labelled
                  LABEL by a in [0, 1] (x + a (centroid - x)): Table 5's perturbation, in expression
                  space rather than embedding space

A dose series writes `{dose}` where the strength goes (`CD8A*{dose}`, `toward:Stroma@{dose}`) and lists
the doses; each dose is one edit. `*` scales counts, so it cannot switch on a gene a spot does not
express (use `+` or `=`). Edited genes get counts expm1(x') x total / 10,000 (the spot's unedited
total); the other genes keep their raw counts bit for bit, so an edit that touches no gene the
encoder reads leaves its input unchanged.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np

from stmdit.errors import InputError

TARGET_SUM = 1e4
OPS = ("*", "+", "-", "=")
_TERM = re.compile(r"^(?P<target>[A-Za-z0-9_.\-/]+?)(?P<op>[*+=]|-(?=[0-9.]))(?P<amount>[0-9]*\.?[0-9]+(?:e[+-]?\d+)?)$")
_TOWARD = re.compile(r"^toward:(?P<label>[^@]+)@(?P<amount>[0-9]*\.?[0-9]+)$")


@dataclass(frozen=True)
class Term:
    """One step of an edit: `op` on `genes` by `amount`, or (op "toward") toward class `label`."""

    op: str
    amount: float
    target: str  # gene symbol, gene-set name, or class label (toward)
    genes: tuple[str, ...] = ()

    def text(self) -> str:
        if self.op == "toward":
            return f"toward:{self.target}@{self.amount:g}"
        return f"{self.target}{self.op}{self.amount:g}"


@dataclass(frozen=True)
class Edit:
    terms: tuple[Term, ...]

    def text(self) -> str:
        return ",".join(t.text() for t in self.terms)

    @property
    def genes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(g for t in self.terms for g in t.genes))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.target for t in self.terms if t.op == "toward"))


def format_dose(template: str, dose: float) -> str:
    return template.replace("{dose}", f"{dose:g}")


def close_matches(name: str, known: Sequence[str]) -> str:
    matches = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    if not matches:  # symbols differ in case more often than in letters (Cd8a, cd8a)
        upper = {k.upper(): k for k in known}
        matches = [upper[m] for m in difflib.get_close_matches(name.upper(), list(upper), n=3, cutoff=0.6)]
    return f"; did you mean {', '.join(matches)}?" if matches else ""


def parse_edit(text: str, genes: Sequence[str], gene_sets: Mapping[str, Sequence[str]] | None = None,
               labels: Sequence[str] = (), source: str | None = None) -> Edit:
    """Parse an edit against the cohort's genes (`genes`), the named gene sets and the known class
    labels. InputError (naming `source`) on a malformed term, an unknown gene (with the closest
    symbols), an unknown set or label, or an amount out of range."""
    gene_sets = dict(gene_sets or {})
    known = set(genes)
    if not isinstance(text, str) or not text.strip():
        raise InputError(source, "the edit is empty")
    if "{dose}" in text:
        raise InputError(source, f"edit {text!r} still holds {{dose}}: give the doses of the series")
    terms = []
    for raw in text.split(","):
        item = raw.strip()
        toward = _TOWARD.match(item)
        if toward:
            label, amount = toward["label"].strip(), float(toward["amount"])
            if label not in labels:
                raise InputError(source, f"edit term {item!r}: no class {label!r}{close_matches(label, labels)} "
                                         f"(labels: {', '.join(sorted(labels))})")
            if not 0 <= amount <= 1:
                raise InputError(source, f"edit term {item!r}: alpha must lie in [0, 1]")
            terms.append(Term("toward", amount, label))
            continue
        match = _TERM.match(item)
        if not match:
            raise InputError(source, f"malformed edit term {item!r}: expected GENE*f, GENE+d, GENE-d, GENE=v, "
                                     "SET*f or toward:LABEL@alpha")
        target, op, amount = match["target"], match["op"], float(match["amount"])
        if target in gene_sets and target in known:
            raise InputError(source, f"edit term {item!r}: {target!r} is both a gene and a gene set; rename the set")
        if target in gene_sets:
            members = tuple(dict.fromkeys(str(g) for g in gene_sets[target]))
            missing = [g for g in members if g not in known]
            if missing:
                raise InputError(source, f"gene set {target!r}: {len(missing)} gene(s) not in the cohort, e.g. "
                                         f"{missing[0]}{close_matches(missing[0], list(known))}")
            if not members:
                raise InputError(source, f"gene set {target!r} is empty")
        elif target in known:
            members = (target,)
        else:
            raise InputError(source, f"edit term {item!r}: unknown gene {target!r}"
                                     f"{close_matches(target, [*known, *gene_sets])}")
        terms.append(Term(op, amount, target, members))
    return Edit(tuple(terms))


def check_reaches_encoder(edit: Edit, encoder_genes: Sequence[str], source: str | None = None) -> None:
    """InputError when a gene term touches no gene the GE encoder reads (the edit could not change
    the model's input)."""
    readable = set(encoder_genes)
    for term in edit.terms:
        if term.op != "toward" and not readable.intersection(term.genes):
            which = f"gene {term.target!r} is" if term.genes == (term.target,) else f"no gene of set {term.target!r} is"
            raise InputError(source, f"edit term {term.text()!r}: {which} among the {len(readable)} genes the GE "
                                     "encoder reads (token_genes of the feature store), so it cannot reach the model")


def log1p_cp10k(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log1p CP10k (n, G) float64, totals (n, 1)) of raw counts."""
    counts = np.asarray(counts, np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    scaled = np.divide(counts * TARGET_SUM, totals, out=np.zeros_like(counts), where=totals > 0)
    return np.log1p(scaled), totals


def apply_edit(edit: Edit, counts: np.ndarray, genes: Sequence[str],
               centroids: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Edited raw counts (n, G) float64 of `counts` (n, G) whose columns are `genes`.
    `centroids`: label -> mean log1p CP10k profile (G,) for toward terms."""
    counts = np.asarray(counts, np.float64)
    x, totals = log1p_cp10k(counts)
    edited = counts.copy()
    column = {g: i for i, g in enumerate(genes)}

    def counts_of(values: np.ndarray) -> np.ndarray:
        return np.maximum(np.expm1(values) * totals / TARGET_SUM, 0.0)

    for term in edit.terms:
        if term.op == "toward":
            target = np.asarray(centroids[term.target], np.float64)
            x = x + term.amount * (target[None, :] - x)
            edited = counts_of(x)
            continue
        cols = np.array([column[g] for g in term.genes])
        if term.op == "*":  # on the counts themselves: *1 is exact, so rank ties stay ties
            edited[:, cols] = edited[:, cols] * term.amount
            x[:, cols] = np.log1p(edited[:, cols] * TARGET_SUM / np.where(totals > 0, totals, 1.0))
            continue
        if term.op == "+":
            x[:, cols] = x[:, cols] + term.amount
        elif term.op == "-":
            x[:, cols] = np.maximum(x[:, cols] - term.amount, 0.0)
        else:
            x[:, cols] = term.amount
        edited[:, cols] = counts_of(x[:, cols])
    return edited


def control_edit(edit: Edit, encoder_genes: Sequence[str], cohort_genes: Sequence[str], kind: str,
                 seed: int) -> tuple[Edit, str]:
    """The control of an edit, and what it is.

    - "shuffled": every gene term acts on as many genes drawn at random (seeded) from the encoder's
      genes outside the edit: an edit of the same size on genes with no claim to the effect; a
      toward term moves toward the same centroid with its genes permuted (resolved by the caller:
      the label gets the suffix "~shuffled").
    - "absent": every gene term acts on cohort genes the encoder does not read; the model's input
      cannot change, so the change must be exactly zero (a check of the experiment itself).
    """
    rng = np.random.default_rng(seed)
    if kind == "absent":
        pool = [g for g in cohort_genes if g not in set(encoder_genes)]
        if not pool:
            raise InputError(None, "control 'absent': every cohort gene is read by the GE encoder; use 'shuffled'")
        if edit.labels:
            raise InputError(None, "control 'absent' has no counterpart for toward: terms; use 'shuffled'")
    elif kind == "shuffled":
        pool = [g for g in encoder_genes if g not in set(edit.genes)]
    else:
        raise InputError(None, f"unknown control {kind!r} (shuffled or absent)")
    terms = []
    for term in edit.terms:
        if term.op == "toward":
            terms.append(replace(term, target=f"{term.target}~shuffled"))
            continue
        n = min(len(term.genes), len(pool))
        if n == 0:
            raise InputError(None, f"control {kind!r}: no gene left to draw from")
        chosen = tuple(str(g) for g in rng.choice(np.array(pool, dtype=object), size=n, replace=False))
        terms.append(Term(term.op, term.amount, f"random{n}" if n > 1 else chosen[0], chosen))
    described = {"shuffled": "the same edit on genes drawn at random from the encoder's gene list (toward: a "
                             "centroid with its genes permuted)",
                 "absent": "the same edit on cohort genes the encoder does not read: the model input is unchanged, "
                           "the change must be 0"}[kind]
    return Edit(tuple(terms)), described


def shuffled_centroid(centroid: np.ndarray, encoder_columns: np.ndarray, seed: int) -> np.ndarray:
    """`centroid` with its values permuted among the encoder's genes (seeded)."""
    out = np.array(centroid, np.float64, copy=True)
    cols = np.asarray(encoder_columns)
    out[cols] = out[cols][np.random.default_rng(seed).permutation(len(cols))]
    return out
