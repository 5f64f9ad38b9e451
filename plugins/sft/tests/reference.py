"""transformers' view of conversations, for the SFT formatting tests.

    python reference.py TOKENIZER_DIR CONVERSATIONS_JSON

prints, for each conversation, the text `apply_chat_template(messages, tokenize=False)`
renders and the ids `apply_chat_template(messages, tokenize=True)` gives, with
date_string fixed for Llama 3.x's "Today Date".
"""
import json
import sys

from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
out = []
for messages in json.load(open(sys.argv[2])):
    text = tokenizer.apply_chat_template(messages, tokenize=False, date_string="26 Jul 2024")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, date_string="26 Jul 2024", return_dict=False)
    out.append({"text": text, "ids": list(ids)})
print(json.dumps(out))
