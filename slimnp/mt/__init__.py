"""Machine translation: n-best reranking with a language model (the
slim-embeddings paper's MT application), an application of slimnp rather
than part of the engine.

    nbest    Moses n-best lists: read, add a feature, rescore, write back unchanged
    bleu     corpus BLEU (sacrebleu's, exactly) and per-hypothesis statistics
    tune     MERT: exact line searches for corpus-BLEU-maximising weights
    rerank   the LM feature, tuning with and without it, and :func:`rerank_nbest`
    fakemt   synthetic n-best lists from reference sentences (a test bed)

:func:`rerank_nbest` is what ``slimnp rerank`` runs::

    >>> from slimnp.inference import load                                   # doctest: +SKIP
    >>> from slimnp.mt import rerank_nbest                              # doctest: +SKIP
    >>> res = rerank_nbest(load("ptb.h5"), "test.nbest", dev_nbest="dev.nbest",
    ...                    dev_refs="dev.ref", test_refs="test.ref")    # doctest: +SKIP
    >>> res.summary["test_bleu"]                                        # doctest: +SKIP
"""
from .rerank import DEFAULT_FEATURE, RerankResult, rerank_nbest

__all__ = ["DEFAULT_FEATURE", "RerankResult", "rerank_nbest"]
