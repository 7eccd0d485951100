"""DeepSeek-VL: relevance scoring (rerank), captions, visual questions and tag verification."""
