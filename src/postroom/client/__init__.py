"""The user's mail tools: send (SMTP submission), fetch (POP3), sendmail and trace."""
