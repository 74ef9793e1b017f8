"""Prompt templates for the tasks and their duals, in our own words.

Several paraphrases per task keep the policy from latching onto one phrasing; the template of an
example is chosen by a seeded hash of its id, so a prepared dataset is reproducible. Placeholders:
``{cell}`` a cell sentence, ``{n}`` a gene count, ``{candidates}`` a comma-separated label list,
``{condition}`` a cell type, ``{condition_text}`` a worded perturbation, ``{drug}``, ``{context}``.
"""

from __future__ import annotations

SYSTEM_PROMPT = (
    "You are an expert in single-cell biology. A cell is written as a cell sentence: the symbols of its "
    "expressed genes, ordered from the most to the least expressed. Reason step by step inside "
    "<think> </think>, then give only the final answer inside <answer> </answer>."
)

ANNOTATION = (
    "Here is a cell sentence, most expressed genes first: {cell}. {context}Which cell type is this "
    "cell? Choose one of: {candidates}.",
    "Identify the type of the following cell from its top expressed genes (highest first): {cell}. "
    "{context}Answer with exactly one of these types: {candidates}.",
    "A single cell expresses these genes most, in decreasing order: {cell}. {context}Candidate cell "
    "types: {candidates}. Which one is it?",
)

GENERATION = (
    "Generate a {condition} cell: list the {n} genes it expresses most, highest first, as gene "
    "symbols separated by spaces.",
    "Write the cell sentence of a typical {condition} cell: {n} gene symbols ordered from the most to "
    "the least expressed.",
    "Imagine a single {condition} cell. Which {n} genes would it express most? List their symbols, "
    "most expressed first, separated by spaces.",
)

DRUG_SENSITIVITY = (
    "This {context}cell has these top expressed genes, highest first: {cell}. Is it sensitive or "
    "resistant to {drug}? Answer with one of: {candidates}.",
    "Predict the response of this {context}cell to {drug}. Its cell sentence (most expressed genes "
    "first) is: {cell}. Choose one of: {candidates}.",
    "Cell sentence of one {context}cell: {cell}. Will {drug} work on it? Answer {candidates}.",
)

PERTURBATION = (
    "A control cell{context} has these top expressed genes, highest first: {cell}. Predict the same "
    "kind of cell after {condition_text}: list the {n} genes it would express most, highest first.",
    "Before perturbation, a cell{context} reads: {cell}. Apply {condition_text} and write the "
    "perturbed cell's sentence: {n} gene symbols, most expressed first.",
    "Control cell sentence{context}: {cell}. What does the cell look like after {condition_text}? "
    "Answer with its {n} most expressed genes in decreasing order.",
)

# Knowledge-graph neighbourhood editing (cellduality.tasks.neighbourhood); it has no dual task.
# {neighbours}: the current neighbourhood, {candidates}: what may be added, {graph}: the graph's name.
NEIGHBOURHOOD = (
    "Target: {condition_text}{context}. In the {graph} knowledge graph, these neighbours of the target "
    "were perturbed in training: {neighbours}. The mean of their measured responses predicts the "
    "target's response. Edit this neighbourhood to predict it better: remove neighbours whose response "
    "should differ, and add perturbations from this list whose response should be similar: "
    "{candidates}. Answer with add: and remove:, each followed by names separated by commas, or none.",
    "We predict the response to {condition_text}{context} as the mean response of its {graph} "
    "graph neighbours measured in training: {neighbours}. Which of them would you remove, and which of "
    "these other measured perturbations would you add: {candidates}? Answer with add: and remove:, "
    "each followed by names separated by commas, or none.",
    "Perturbation to predict: {condition_text}{context}. Its neighbourhood in the {graph} graph, among "
    "the perturbations measured in training: {neighbours}. Other measured perturbations: {candidates}. "
    "Refine the neighbourhood whose mean response is the prediction. Answer with add: and remove:, each "
    "followed by names separated by commas, or none.",
)

FORWARD = {
    "annotation": ANNOTATION,
    "generation": GENERATION,
    "drug_sensitivity": DRUG_SENSITIVITY,
    "perturbation": PERTURBATION,
    "neighbourhood": NEIGHBOURHOOD,
}

# Dual of the classification tasks: in-paint the hidden genes from the visible ones and the label.
INPAINT = (
    "A {label} cell has these genes among its most expressed, in order, with {n} of them hidden: "
    "{cell}. Name the {n} hidden genes, most expressed first.",
    "Some genes are missing from the cell sentence of a {label} cell: {cell}. List the {n} missing "
    "genes, highest expression first.",
)

# Dual of cell-type generation: name the type of a generated cell.
RECONSTRUCT_TYPE = (
    "Here is a cell sentence, most expressed genes first: {cell}. Which cell type produced it? Choose "
    "one of: {candidates}.",
    "Name the type of this cell from its top expressed genes: {cell}. Candidates: {candidates}.",
)

# Dual of perturbation response: name the perturbation from the control and the perturbed cell.
RECONSTRUCT_PERTURBATION = (
    "Control cell{context}: {control}. The same kind of cell after an unknown perturbation: {cell}. "
    "Which perturbation was applied? Choose one of: {candidates}.",
    "Compare a control cell{context} ({control}) with a perturbed cell ({cell}). Which of these "
    "perturbations explains the difference: {candidates}?",
)
