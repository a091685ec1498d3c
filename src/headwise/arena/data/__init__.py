"""Task data for the arena: seeded generators and offline loaders, one file per task.

Every generator is a pure function of its arguments and a ``torch.Generator`` (same seed, same batch); token
targets use ``IGNORE_INDEX`` (-100) at unlabelled positions. Nothing is downloaded: Fashion-MNIST comes from
Debian's ``dataset-fashion-mnist`` package and the text from CPython's ``pydoc_data``.
"""

from headwise.arena.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, fashion_mnist, read_idx
from headwise.arena.data.icl_regression import (gd_one_step_predict, gd_optimal_step, icl_regression_batch,
                                                icl_tokens, ridge_predict, zero_predict)
from headwise.arena.data.induction import induction_batch
from headwise.arena.data.listops import (LISTOPS_LRA, LISTOPS_QUICK, LISTOPS_TOKENS, LISTOPS_VOCAB, listops_batch,
                                         listops_tokens, listops_tree, listops_value)
from headwise.arena.data.mqar import IGNORE_INDEX, mqar_batch, mqar_gap_probs, mqar_mixed_batch
from headwise.arena.data.passkey import KEY_MARK, PASSKEY_VOCAB, QUERY, passkey_batch
from headwise.arena.data.text import TEXT_VOCAB, text_batch, text_corpus, text_windows

__all__ = ["IGNORE_INDEX",
           "mqar_batch", "mqar_mixed_batch", "mqar_gap_probs",
           "icl_regression_batch", "icl_tokens", "ridge_predict", "gd_one_step_predict", "gd_optimal_step",
           "zero_predict",
           "induction_batch",
           "passkey_batch", "PASSKEY_VOCAB", "KEY_MARK", "QUERY",
           "fashion_mnist", "read_idx", "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES",
           "text_corpus", "text_batch", "text_windows", "TEXT_VOCAB",
           "listops_batch", "listops_tree", "listops_tokens", "listops_value", "LISTOPS_TOKENS", "LISTOPS_VOCAB",
           "LISTOPS_QUICK", "LISTOPS_LRA"]
