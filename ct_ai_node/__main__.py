from ct_ai_node.cli import app

if __name__ == "__main__":
    app()
