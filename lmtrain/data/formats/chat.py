"""chat: `messages` records rendered with the chat template; stored and packed as sft, masked on assistant turns."""

from __future__ import annotations

from lmtrain.data.examples import ChatEncoder, load_chat_template
from lmtrain.data.formats.base import register_format
from lmtrain.data.formats.sft import SftFormat


class ChatFormat(SftFormat):
    name = "chat"
    key_field = "messages_field"
    records = "a messages field"

    def make_encoder(self, tokenizer, args):
        template = load_chat_template(args.chat_template) if args.chat_template else None
        return ChatEncoder(tokenizer.hf, args.seq_len + 1, args.too_long, args.train_on_prompt, args.messages_field,
                           template)


CHAT = register_format(ChatFormat())
