"""Images for vision-language models: loading and preprocessing in the front
end (image_loader.py, processor.py), the inputs a request carries to the
scheduler (inputs.py), and the encoder's rows for each forward (embedder.py)."""
