"""DuPLUS training code: prompts, text encoder, model, phantoms, data, preprocessing, training and evaluation."""
