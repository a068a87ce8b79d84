"""Inference: batched generation (generate), prediction and scoring (predict), and the chat shared by the web
page (web) and the terminal (terminal)."""
