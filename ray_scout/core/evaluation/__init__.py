"""Evaluation: the tasks a request answers, how an answer is scored, and the quality harness.

Tasks make or load (document, question, answers) samples; metrics score answers (F1, EM,
contains) with bootstrap CIs and paired tests; the quality harness runs every mode and
selector through the same stages the testbed runs and writes a quality profile the policy
plans with. It may use ``llm``, ``stages`` and ``control``'s profile types; nothing below
uses it.
"""
