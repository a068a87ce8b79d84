"""Chat with the fine-tuned model in the browser (Streamlit).

    streamlit run web_demo.py                                         # the embedded default model
    streamlit run web_demo.py -- --model_dir output/demo/adapter      # the demo's fine-tune
    streamlit run web_demo.py -- --model_dir output/demo/adapter --side_by_side

Flags after `--` are predict_fora.py's model flags (--model_dir: an adapter, a checkpoint-N, a merged
model; --ori_model_dir, --template, --torch_dtype, --quantization_bit, --trust_remote_code,
--max_source_length) and the chat's own starting values (`python cli_demo.py --help` lists them all;
fora/args/chat.py). The model loads once per server process and serves every tab. Run from the
repository folder, the server listens on 127.0.0.1 only (.streamlit/config.toml); add
`--server.address 0.0.0.0` before `--` to open it to the network.

While a reply streams, the message box's send button stops it; anything that reruns the page mid-reply
(a sidebar change) also keeps what was generated, marked stopped. `--compare_dir B` puts a second adapter
of the same base beside the first.
"""

from fora.infer.web import main

if __name__ == "__main__":
    main()
