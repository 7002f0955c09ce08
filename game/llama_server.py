"""llama-cpp-python's OpenAI-compatible server as the game's tests and `serve-config llama-cpp` start it.

    python -m game.llama_server --config_file llama-cpp.json     # = python -m llama_cpp.server --config_file ...

The same server, run inside game.llamacpp.plain_cpu_buffers: on a CPU with AMX, llama.cpp's AMX weight buffers
crash its first decode, and the server's own settings cannot turn them off.
"""

import runpy

from game.llamacpp import plain_cpu_buffers

if __name__ == "__main__":
    with plain_cpu_buffers():
        runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
