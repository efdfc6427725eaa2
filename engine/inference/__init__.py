"""After training: load a trained model (loading.py), generate (generate.py), chat (chat.py), evaluate
(evaluate.py). The command lines are engine/chat.py and engine/evaluate.py."""
