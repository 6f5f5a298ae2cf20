"""app_ui: the tenant's Streamlit front end. ``app.py`` is the script ``streamlit run`` executes."""
